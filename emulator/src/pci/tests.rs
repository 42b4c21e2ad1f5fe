use super::caps::*;
use super::*;

const BAR0_SIZE: u64 = 1 << 20;

fn params(msix_vectors: u16) -> ConfigParams {
    ConfigParams {
        msix_vectors,
        bar0_size: BAR0_SIZE,
        bar2_size: None,
        msix_table_offset: 0x4000,
        msix_pba_offset: 0x5000,
        total_vfs: 0,
    }
}

fn space(kind: FunctionKind) -> ConfigSpace {
    ConfigSpace::new(kind, params(16)).unwrap()
}

fn read_n<const N: usize>(cs: &ConfigSpace, offset: usize) -> [u8; N] {
    let mut buf = [0; N];
    cs.read(offset as u64, &mut buf).unwrap();
    buf
}

fn r16(cs: &ConfigSpace, offset: usize) -> u16 {
    u16::from_le_bytes(read_n(cs, offset))
}

fn r32(cs: &ConfigSpace, offset: usize) -> u32 {
    u32::from_le_bytes(read_n(cs, offset))
}

fn w16(cs: &mut ConfigSpace, offset: usize, v: u16) -> ConfigWriteEffects {
    cs.write(offset as u64, &v.to_le_bytes()).unwrap()
}

fn w32(cs: &mut ConfigSpace, offset: usize, v: u32) -> ConfigWriteEffects {
    cs.write(offset as u64, &v.to_le_bytes()).unwrap()
}

#[test]
fn ids_and_class_read_back() {
    for (kind, device, subsystem, pin) in [
        (
            FunctionKind::Pf,
            0x101d,
            SUBSYSTEM_ID_PF,
            INTERRUPT_PIN_INTA,
        ),
        (
            FunctionKind::Vf,
            0x101e,
            SUBSYSTEM_ID_VF,
            INTERRUPT_PIN_NONE,
        ),
    ] {
        let cs = space(kind);
        assert_eq!(r16(&cs, VENDOR_ID_OFFSET), 0x15b3);
        assert_eq!(r16(&cs, DEVICE_ID_OFFSET), device);
        assert_eq!((cs.vendor_id(), cs.device_id()), (0x15b3, device));
        // Revision, prog-if, subclass, class.
        assert_eq!(read_n::<4>(&cs, REVISION_ID_OFFSET), [0, 0x00, 0x00, 0x02]);
        assert_eq!(read_n::<1>(&cs, HEADER_TYPE_OFFSET), [0]);
        assert_eq!(r16(&cs, SUBSYSTEM_VENDOR_ID_OFFSET), 0x15b3);
        assert_eq!(r16(&cs, SUBSYSTEM_ID_OFFSET), subsystem);
        assert_eq!(r16(&cs, STATUS_OFFSET), STATUS_CAP_LIST);
        assert_eq!(cs.interrupt_pin(), pin);
        assert_eq!(r32(&cs, ROM_ADDRESS_OFFSET), 0);
        assert!(!cs.memory_enabled() && !cs.bus_master() && !cs.msix_enabled());
    }
}

#[test]
fn bar0_sizing_round_trip() {
    let mut cs = space(FunctionKind::Vf);
    let flags = BAR_MEM_TYPE_64 | BAR_MEM_PREFETCH;
    assert_eq!(r32(&cs, BAR0_OFFSET), flags);
    w32(&mut cs, BAR0_OFFSET, 0xffff_ffff);
    w32(&mut cs, BAR0_OFFSET + 4, 0xffff_ffff);
    let lo = r32(&cs, BAR0_OFFSET);
    let hi = r32(&cs, BAR0_OFFSET + 4);
    assert_eq!((lo, hi), (0xfff0_0000 | flags, 0xffff_ffff));
    let mask = u64::from(hi) << 32 | u64::from(lo & BAR_MEM_ADDRESS_MASK);
    assert_eq!(!mask + 1, BAR0_SIZE);

    // A real address sticks, the type bits stay.
    w32(&mut cs, BAR0_OFFSET, 0xc010_0000);
    w32(&mut cs, BAR0_OFFSET + 4, 0x0000_0001);
    assert_eq!(r32(&cs, BAR0_OFFSET), 0xc010_0000 | flags);
    assert_eq!(r32(&cs, BAR0_OFFSET + 4), 1);
}

#[test]
fn bar2_only_when_configured_and_other_bars_read_zero() {
    let mut p = params(16);
    p.bar2_size = Some(1 << 32);
    let mut cs = ConfigSpace::new(FunctionKind::Vf, p).unwrap();
    for off in (BAR2_OFFSET..=0x24).step_by(4) {
        w32(&mut cs, off, 0xffff_ffff);
    }
    w32(&mut cs, ROM_ADDRESS_OFFSET, 0xffff_ffff);
    let flags = BAR_MEM_TYPE_64 | BAR_MEM_PREFETCH;
    assert_eq!(r32(&cs, BAR2_OFFSET), flags);
    assert_eq!(r32(&cs, BAR2_OFFSET + 4), 0xffff_ffff);
    assert_eq!([r32(&cs, 0x20), r32(&cs, 0x24)], [0, 0]);
    assert_eq!(r32(&cs, ROM_ADDRESS_OFFSET), 0);
    // The largest device memory (16 GiB): the size lies in the upper dword alone.
    let mut p = params(16);
    p.bar2_size = Some(crate::devmem::MAX_DEV_MEM_SIZE);
    let mut cs = ConfigSpace::new(FunctionKind::Vf, p).unwrap();
    w32(&mut cs, BAR2_OFFSET, 0xffff_ffff);
    w32(&mut cs, BAR2_OFFSET + 4, 0xffff_ffff);
    assert_eq!(r32(&cs, BAR2_OFFSET), flags);
    let mask = u64::from(r32(&cs, BAR2_OFFSET + 4)) << 32 | u64::from(r32(&cs, BAR2_OFFSET) & !0xf);
    assert_eq!(!mask + 1, 16 << 30);

    let mut cs = space(FunctionKind::Vf);
    for off in (BAR2_OFFSET..=0x24).step_by(4) {
        w32(&mut cs, off, 0xffff_ffff);
        assert_eq!(r32(&cs, off), 0);
    }
}

#[test]
fn read_only_bits_are_not_writable() {
    let mut cs = space(FunctionKind::Pf);
    let before = read_n::<CONFIG_SPACE_SIZE>(&cs, 0);
    w32(&mut cs, VENDOR_ID_OFFSET, 0);
    w32(&mut cs, REVISION_ID_OFFSET, 0xffff_ffff);
    w16(&mut cs, HEADER_TYPE_OFFSET, 0xffff);
    w32(&mut cs, SUBSYSTEM_VENDOR_ID_OFFSET, 0);
    w32(&mut cs, CAPABILITY_LIST_OFFSET, 0);
    w16(&mut cs, INTERRUPT_PIN_OFFSET, 0xffff);
    w32(&mut cs, PCIE_CAP_OFFSET + PCIE_DEVCAP_OFFSET, 0);
    w32(&mut cs, PCIE_CAP_OFFSET + PCIE_LNKCAP_OFFSET, 0);
    w32(&mut cs, MSIX_CAP_OFFSET, 0);
    w32(&mut cs, MSIX_CAP_OFFSET + MSIX_TABLE_OFFSET, 0xffff_ffff);
    w32(&mut cs, ARI_EXT_CAP_OFFSET, 0);
    cs.write(0x200, &[0xaa; 0x100]).unwrap();
    let after = read_n::<CONFIG_SPACE_SIZE>(&cs, 0);
    // Only the writable bytes (interrupt line, here) may differ.
    for (i, (a, b)) in before.iter().zip(after.iter()).enumerate() {
        assert!(a == b || i == INTERRUPT_LINE_OFFSET, "byte {i:#x} changed");
    }

    // Command: only Memory, Bus Master and INTx Disable stick, and the change is reported.
    let fx = w16(&mut cs, COMMAND_OFFSET, 0xffff);
    assert_eq!(r16(&cs, COMMAND_OFFSET), COMMAND_WRITABLE);
    assert_eq!(fx.command, Some(COMMAND_WRITABLE));
    assert!(cs.memory_enabled() && cs.bus_master() && cs.intx_disabled());
    assert_eq!(w16(&mut cs, COMMAND_OFFSET, 0xffff).command, None);
    // Status: Capabilities List stays, nothing else appears.
    w16(&mut cs, STATUS_OFFSET, 0xffff);
    assert_eq!(r16(&cs, STATUS_OFFSET), STATUS_CAP_LIST);
}

#[test]
fn rw1c_bits_clear_on_one_only() {
    let mut cs = space(FunctionKind::Vf);
    cs.record_status_error(STATUS_REC_MASTER_ABORT | STATUS_SIG_TARGET_ABORT | STATUS_CAP_LIST);
    let latched = STATUS_CAP_LIST | STATUS_REC_MASTER_ABORT | STATUS_SIG_TARGET_ABORT;
    assert_eq!(r16(&cs, STATUS_OFFSET), latched);
    w16(&mut cs, STATUS_OFFSET, 0);
    assert_eq!(r16(&cs, STATUS_OFFSET), latched);
    // A dword write of command + status clears one bit and sets command bits.
    let fx = w32(
        &mut cs,
        COMMAND_OFFSET,
        u32::from(STATUS_REC_MASTER_ABORT) << 16 | u32::from(COMMAND_BUS_MASTER),
    );
    assert_eq!(fx.command, Some(COMMAND_BUS_MASTER));
    assert_eq!(
        r16(&cs, STATUS_OFFSET),
        STATUS_CAP_LIST | STATUS_SIG_TARGET_ABORT
    );

    let devsta = PCIE_CAP_OFFSET + PCIE_DEVSTA_OFFSET;
    cs.record_device_error(PCIE_DEVSTA_URD | PCIE_DEVSTA_CED | 1 << 5);
    assert_eq!(r16(&cs, devsta), PCIE_DEVSTA_URD | PCIE_DEVSTA_CED);
    w16(&mut cs, devsta, 0xffff);
    assert_eq!(r16(&cs, devsta), 0);
}

#[test]
fn flr_reports_event_and_reads_zero() {
    let mut cs = space(FunctionKind::Vf);
    let devctl = PCIE_CAP_OFFSET + PCIE_DEVCTL_OFFSET;
    assert_eq!(r16(&cs, devctl), PCIE_DEVCTL_RESET);
    assert_ne!(
        r32(&cs, PCIE_CAP_OFFSET + PCIE_DEVCAP_OFFSET) & PCIE_DEVCAP_FLR,
        0
    );

    let fx = w16(&mut cs, devctl, PCIE_DEVCTL_BCR_FLR | PCIE_DEVCTL_EXT_TAG);
    assert!(fx.flr);
    assert_eq!(r16(&cs, devctl), PCIE_DEVCTL_EXT_TAG);

    // A byte write of just the upper half triggers too; a write without the bit does not.
    assert!(cs.write((devctl + 1) as u64, &[0x80]).unwrap().flr);
    assert!(!w16(&mut cs, devctl, PCIE_DEVCTL_RESET).flr);
    assert!(!cs.write(devctl as u64, &[0xff]).unwrap().flr);
    assert!(w32(&mut cs, devctl, u32::from(PCIE_DEVCTL_BCR_FLR)).flr);
    assert_eq!(r16(&cs, devctl) & PCIE_DEVCTL_BCR_FLR, 0);
}

#[test]
fn msix_capability_fields() {
    let mut p = params(64);
    p.msix_table_offset = 0x2_0000;
    p.msix_pba_offset = 0x3_0008;
    let mut cs = ConfigSpace::new(FunctionKind::Pf, p).unwrap();
    let flags = MSIX_CAP_OFFSET + MSIX_FLAGS_OFFSET;
    assert_eq!(MSIX_CAP_OFFSET, 0x9c);
    assert_eq!(r16(&cs, flags) & MSIX_FLAGS_QSIZE, 63);
    let table = r32(&cs, MSIX_CAP_OFFSET + MSIX_TABLE_OFFSET);
    let pba = r32(&cs, MSIX_CAP_OFFSET + MSIX_PBA_OFFSET);
    assert_eq!(
        (table & MSIX_BIR_MASK, table & MSIX_OFFSET_MASK),
        (0, 0x2_0000)
    );
    assert_eq!((pba & MSIX_BIR_MASK, pba & MSIX_OFFSET_MASK), (0, 0x3_0008));

    let fx = w16(&mut cs, flags, 0xffff);
    assert_eq!(r16(&cs, flags), MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL | 63);
    assert_eq!(
        (fx.msix_enable, fx.msix_function_mask),
        (Some(true), Some(true))
    );
    assert!(cs.msix_enabled() && cs.msix_function_masked());
    let fx = w16(&mut cs, flags, MSIX_FLAGS_ENABLE);
    assert_eq!((fx.msix_enable, fx.msix_function_mask), (None, Some(false)));
    assert!(cs.msix_enabled() && !cs.msix_function_masked());
    assert!(w16(&mut cs, flags, MSIX_FLAGS_ENABLE).is_empty());
}

#[test]
fn capability_chain_terminates_with_pcie_and_msix() {
    let cs = space(FunctionKind::Vf);
    let mut ids = Vec::new();
    let mut ptr = read_n::<1>(&cs, CAPABILITY_LIST_OFFSET)[0] & CAPABILITY_POINTER_MASK;
    // 48 is the most capabilities that fit in the 192 bytes after the header.
    for _ in 0..48 {
        if ptr == CAP_NEXT_END {
            break;
        }
        let [id, next] = read_n::<2>(&cs, ptr.into());
        ids.push((id, ptr));
        ptr = next & CAPABILITY_POINTER_MASK;
    }
    assert_eq!(ptr, CAP_NEXT_END, "chain does not terminate");
    assert_eq!(ids, [(CAP_ID_PCIE, 0x60), (CAP_ID_MSIX, 0x9c)]);

    let pcie_flags = r16(&cs, PCIE_CAP_OFFSET + PCIE_FLAGS_OFFSET);
    assert_eq!((pcie_flags & 0xf, pcie_flags >> 4 & 0xf), (2, 0));
    let lnksta = r16(&cs, PCIE_CAP_OFFSET + PCIE_LNKSTA_OFFSET);
    assert_eq!((lnksta & 0xf, lnksta >> 4 & 0x3f), (4, 8));

    let ext = r32(&cs, HEADER_SPACE_SIZE);
    assert_eq!(ext & 0xffff, u32::from(EXT_CAP_ID_ARI));
    assert_eq!(ext >> EXT_CAP_NEXT_SHIFT, ACS_EXT_CAP_OFFSET as u32);
}

#[test]
fn out_of_range_reads_all_ones_and_writes_drop() {
    let mut cs = space(FunctionKind::Vf);
    let mut buf = [0u8; 4];
    cs.read(0xffe, &mut buf).unwrap();
    assert_eq!(buf, [0, 0, 0xff, 0xff]);
    cs.read(0x1_0000, &mut buf).unwrap();
    assert_eq!(buf, [0xff; 4]);
    cs.read(u64::MAX - 4, &mut buf).unwrap();
    assert_eq!(buf, [0xff; 4]);

    let before = read_n::<CONFIG_SPACE_SIZE>(&cs, 0);
    assert!(cs.write(0x1000, &[0xff; 8]).unwrap().is_empty());
    assert!(cs.write(u64::MAX - 8, &[0xff; 8]).unwrap().is_empty());
    assert_eq!(read_n::<CONFIG_SPACE_SIZE>(&cs, 0), before);

    // Unaligned multi-register access within range works byte-wise.
    assert_eq!(read_n::<3>(&cs, 0x01), [0x15, 0x1e, 0x10]);
    cs.read(0, &mut []).unwrap();
}

#[test]
fn overflowing_offset_is_an_error() {
    let mut cs = space(FunctionKind::Pf);
    let mut buf = [0u8; 2];
    let err = PciError::AccessOverflow {
        offset: u64::MAX,
        len: 2,
    };
    assert_eq!(cs.read(u64::MAX, &mut buf), Err(err.clone()));
    assert_eq!(cs.write(u64::MAX, &buf), Err(err));
}

#[test]
fn reset_restores_power_on_values() {
    let mut cs = space(FunctionKind::Pf);
    let fresh = read_n::<CONFIG_SPACE_SIZE>(&cs, 0);
    w16(&mut cs, COMMAND_OFFSET, COMMAND_WRITABLE);
    w32(&mut cs, BAR0_OFFSET, 0xfeb0_0000);
    w16(&mut cs, MSIX_CAP_OFFSET + MSIX_FLAGS_OFFSET, 0xc000);
    w16(&mut cs, PCIE_CAP_OFFSET + PCIE_DEVCTL_OFFSET, 0x7fff);
    cs.write(INTERRUPT_LINE_OFFSET as u64, &[11]).unwrap();
    cs.record_status_error(STATUS_DETECTED_PARITY);
    cs.record_device_error(PCIE_DEVSTA_FED);
    assert_ne!(read_n::<CONFIG_SPACE_SIZE>(&cs, 0), fresh);
    cs.reset();
    assert_eq!(read_n::<CONFIG_SPACE_SIZE>(&cs, 0), fresh);
    assert!(!cs.msix_enabled() && !cs.bus_master() && !cs.memory_enabled());
}

#[test]
fn bad_params_are_rejected() {
    let bad = |f: fn(&mut ConfigParams)| {
        let mut p = params(16);
        f(&mut p);
        ConfigSpace::new(FunctionKind::Vf, p).unwrap_err()
    };
    assert!(matches!(
        bad(|p| p.msix_vectors = 7),
        PciError::MsixVectors { got: 7, .. }
    ));
    assert!(matches!(
        bad(|p| p.msix_vectors = 2049),
        PciError::MsixVectors { .. }
    ));
    assert!(matches!(
        bad(|p| p.bar0_size = 3 << 20),
        PciError::BarSize { bar: 0, .. }
    ));
    assert!(matches!(
        bad(|p| p.bar0_size = 2048),
        PciError::BarSize { bar: 0, .. }
    ));
    assert!(matches!(
        bad(|p| p.bar2_size = Some(0)),
        PciError::BarSize { bar: 2, .. }
    ));
    assert!(matches!(
        bad(|p| p.msix_table_offset = 0x4004),
        PciError::MsixPlacement { .. }
    ));
    assert!(matches!(
        bad(|p| p.msix_pba_offset = 0xffff_fff8),
        PciError::MsixPlacement { .. }
    ));
    assert!(matches!(
        bad(|p| p.msix_pba_offset = 0x40f8),
        PciError::MsixOverlap { .. }
    ));
    // Table (256 bytes) ending exactly where the PBA starts is fine.
    let mut p = params(16);
    p.msix_pba_offset = 0x4100;
    assert!(ConfigSpace::new(FunctionKind::Vf, p).is_ok());
}

fn pf_with_vfs(total_vfs: u16) -> ConfigSpace {
    ConfigSpace::new(
        FunctionKind::Pf,
        ConfigParams {
            total_vfs,
            bar2_size: Some(1 << 16),
            ..params(16)
        },
    )
    .unwrap()
}

/// The extended capability chain from 0x100, as (id, offset, version).
fn ext_caps(cs: &ConfigSpace) -> Vec<(u16, usize, u32)> {
    let mut out = Vec::new();
    let mut at = HEADER_SPACE_SIZE;
    for _ in 0..64 {
        let h = r32(cs, at);
        out.push(((h & 0xffff) as u16, at, h >> EXT_CAP_VERSION_SHIFT & 0xf));
        at = (h >> EXT_CAP_NEXT_SHIFT) as usize;
        if at == 0 {
            return out;
        }
    }
    panic!("extended chain does not terminate: {out:?}");
}

#[test]
fn pf_with_vfs_carries_an_sriov_capability_as_linux_sriov_init_reads_it() {
    use super::sriov::*;
    let cs = pf_with_vfs(4);
    assert_eq!(
        ext_caps(&cs),
        [
            (EXT_CAP_ID_ARI, ARI_EXT_CAP_OFFSET, 1),
            (EXT_CAP_ID_SRIOV, SRIOV_EXT_CAP_OFFSET, 1),
            (EXT_CAP_ID_ACS, ACS_EXT_CAP_OFFSET, 1)
        ]
    );
    let at = |rel| SRIOV_EXT_CAP_OFFSET + rel;
    assert_eq!(r32(&cs, at(SRIOV_CAP_OFFSET)), 0, "no VF Migration");
    assert_eq!(r16(&cs, at(SRIOV_CTRL_OFFSET)), 0);
    assert_eq!(r16(&cs, at(SRIOV_INITIAL_VF_OFFSET)), 4);
    assert_eq!(r16(&cs, at(SRIOV_TOTAL_VF_OFFSET)), 4);
    assert_eq!(r16(&cs, at(SRIOV_NUM_VF_OFFSET)), 0);
    assert_eq!(r16(&cs, at(SRIOV_VF_OFFSET_OFFSET)), 1);
    assert_eq!(r16(&cs, at(SRIOV_VF_STRIDE_OFFSET)), 1);
    assert_eq!(r16(&cs, at(SRIOV_VF_DID_OFFSET)), DEVICE_ID_VF);
    assert_eq!(r32(&cs, at(SRIOV_SUP_PGSIZE_OFFSET)), 0x7ff);
    assert_eq!(r32(&cs, at(SRIOV_SYS_PGSIZE_OFFSET)), 1, "4 KiB");
    // VF BAR0 and BAR2: 64-bit prefetchable, sized like the VFs' own BARs.
    let mut cs = cs;
    for (bar, size) in [(0usize, BAR0_SIZE), (2, 1 << 16)] {
        let lo = at(SRIOV_BAR_OFFSET + 4 * bar);
        assert_eq!(r32(&cs, lo), BAR_MEM_TYPE_64 | BAR_MEM_PREFETCH);
        w32(&mut cs, lo, !0);
        w32(&mut cs, lo + 4, !0);
        let mask =
            u64::from(r32(&cs, lo) & BAR_MEM_ADDRESS_MASK) | u64::from(r32(&cs, lo + 4)) << 32;
        assert_eq!(!mask + 1, size, "VF BAR{bar} size");
    }
    assert_eq!(r32(&cs, at(SRIOV_BAR_OFFSET + 16)), 0, "no VF BAR4");
    // The VF and a PF built without VFs carry none.
    for cs in [space(FunctionKind::Vf), space(FunctionKind::Pf)] {
        assert_eq!(
            ext_caps(&cs),
            [
                (EXT_CAP_ID_ARI, ARI_EXT_CAP_OFFSET, 1),
                (EXT_CAP_ID_ACS, ACS_EXT_CAP_OFFSET, 1)
            ]
        );
        assert_eq!(cs.sriov_control(), None);
    }
}

#[test]
fn sriov_enable_follows_the_spec_and_reports_its_effect() {
    use super::sriov::*;
    let mut cs = pf_with_vfs(4);
    let at = |rel| SRIOV_EXT_CAP_OFFSET + rel;
    // What Linux's sriov_enable does: NumVFs, then VF Enable | VF MSE.
    let fx = w16(&mut cs, at(SRIOV_NUM_VF_OFFSET), 2);
    assert_eq!(
        fx.sriov,
        Some(SriovControl {
            vf_enable: false,
            vf_memory: false,
            num_vfs: 2
        })
    );
    let fx = w16(
        &mut cs,
        at(SRIOV_CTRL_OFFSET),
        SRIOV_CTRL_VFE | SRIOV_CTRL_MSE | SRIOV_CTRL_VFM,
    );
    assert_eq!(
        fx.sriov,
        Some(SriovControl {
            vf_enable: true,
            vf_memory: true,
            num_vfs: 2
        })
    );
    assert_eq!(
        r16(&cs, at(SRIOV_CTRL_OFFSET)),
        SRIOV_CTRL_VFE | SRIOV_CTRL_MSE,
        "VF Migration Enable is read-only zero"
    );
    // NumVFs is frozen while VF Enable is set.
    assert!(w16(&mut cs, at(SRIOV_NUM_VF_OFFSET), 3).sriov.is_none());
    assert_eq!(r16(&cs, at(SRIOV_NUM_VF_OFFSET)), 2);
    // Read-only fields stay.
    w16(&mut cs, at(SRIOV_TOTAL_VF_OFFSET), 9);
    w16(&mut cs, at(SRIOV_VF_DID_OFFSET), 0);
    assert_eq!(r16(&cs, at(SRIOV_TOTAL_VF_OFFSET)), 4);
    assert_eq!(r16(&cs, at(SRIOV_VF_DID_OFFSET)), DEVICE_ID_VF);
    // System Page Size takes one supported size; others are dropped.
    w32(&mut cs, at(SRIOV_SYS_PGSIZE_OFFSET), 0x10);
    assert_eq!(r32(&cs, at(SRIOV_SYS_PGSIZE_OFFSET)), 0x10);
    for bad in [0, 0x3, 0x800] {
        w32(&mut cs, at(SRIOV_SYS_PGSIZE_OFFSET), bad);
        assert_eq!(r32(&cs, at(SRIOV_SYS_PGSIZE_OFFSET)), 0x10, "{bad:#x}");
    }
    // Disable, then NumVFs is writable again; FLR returns everything to power-on.
    w16(&mut cs, at(SRIOV_CTRL_OFFSET), 0);
    w16(&mut cs, at(SRIOV_NUM_VF_OFFSET), 4);
    assert_eq!(r16(&cs, at(SRIOV_NUM_VF_OFFSET)), 4);
    w16(&mut cs, at(SRIOV_CTRL_OFFSET), SRIOV_CTRL_VFE);
    cs.reset();
    assert_eq!(
        cs.sriov_control(),
        Some(SriovControl {
            vf_enable: false,
            vf_memory: false,
            num_vfs: 0
        })
    );
    assert_eq!(r32(&cs, at(SRIOV_SYS_PGSIZE_OFFSET)), 1);
}

#[test]
fn sriov_parameters_are_validated() {
    let vf = ConfigSpace::new(
        FunctionKind::Vf,
        ConfigParams {
            total_vfs: 1,
            ..params(16)
        },
    );
    assert_eq!(vf.unwrap_err(), PciError::SriovOnVf { got: 1 });
    let pf = ConfigSpace::new(
        FunctionKind::Pf,
        ConfigParams {
            total_vfs: 256,
            ..params(16)
        },
    );
    assert_eq!(pf.unwrap_err(), PciError::TooManyVfs { got: 256, max: 255 });
}

/// Every function carries an ACS capability with no control implemented, read-only:
/// Linux's `pci_acs_flags_enabled` masks the required flags (SV | RR | CR | UF) with
/// the Capability register, 0, and finds Control satisfying them, so the functions of
/// the slot get IOMMU groups of their own; a guest write cannot change that.
#[test]
fn every_function_has_a_read_only_acs_capability_isolating_it() {
    for mut cs in [
        space(FunctionKind::Vf),
        space(FunctionKind::Pf),
        pf_with_vfs(2),
    ] {
        let caps = ext_caps(&cs);
        assert_eq!(
            caps.last(),
            Some(&(EXT_CAP_ID_ACS, ACS_EXT_CAP_OFFSET, 1)),
            "{caps:?}"
        );
        let cap = ACS_EXT_CAP_OFFSET + ACS_CAP_OFFSET;
        let ctrl = ACS_EXT_CAP_OFFSET + ACS_CTRL_OFFSET;
        // What pci_std_enable_acs writes when an IOMMU asked for ACS.
        assert!(w16(&mut cs, ctrl, 0x001f).is_empty());
        assert_eq!((r16(&cs, cap), r16(&cs, ctrl)), (0, 0));
        // The capability survives a reset unchanged.
        cs.reset();
        assert_eq!(ext_caps(&cs).last().unwrap().0, EXT_CAP_ID_ACS);
    }
}
