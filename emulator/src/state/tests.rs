use super::*;
use zerocopy::{FromZeros, IntoBytes};

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Recomputes the checksum after a deliberate edit, so deeper checks are reached.
fn reseal(b: &mut [u8]) {
    let end = b.len() - CHECKSUM_LEN;
    let sum = sum::checksum(&b[..end]);
    b[end..].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn image_round_trips_and_has_the_predicted_length() {
    let img = sample_image();
    let b = img.to_bytes();
    assert_eq!(b.len(), image_len(objects_len(&img.objects), 3));
    assert_eq!(&b[..8], b"MLX5VHCA");
    assert_eq!(validate(&b).unwrap(), img);
    // Every page on a 4 KiB image offset: the last ones end right before the checksum.
    let end = b.len() - CHECKSUM_LEN;
    assert_eq!(end % 4096, 0);
    for (k, p) in img.pages.iter().rev().enumerate() {
        assert_eq!(&b[end - (k + 1) * 4096..end - k * 4096], &p.data[..]);
    }
}

#[test]
fn every_single_bit_flip_is_refused() {
    let b = sample_image().to_bytes();
    // Every bit of the header, table and objects; a stride through the pages.
    let dense = HEADER_LEN
        + SECTIONS_WRITTEN.len() * SECTION_ENTRY_LEN
        + HCA_SECTION_LEN
        + ISEG_SECTION_LEN
        + 400;
    let positions = (0..dense).chain((dense..b.len()).step_by(97));
    for at in positions {
        for bit in 0..8 {
            let mut c = b.clone();
            c[at] ^= 1 << bit;
            assert!(
                validate(&c).is_err(),
                "flip of byte {at} bit {bit} accepted"
            );
            assert!(
                stream(&c).is_err(),
                "flip of byte {at} bit {bit} accepted in pieces"
            );
        }
    }
}

#[test]
fn every_truncation_is_refused() {
    let b = sample_image().to_bytes();
    for len in (0..b.len()).rev().step_by(7).chain([b.len() - 1, 0, 71]) {
        assert!(validate(&b[..len]).is_err(), "truncation to {len} accepted");
        assert!(
            stream(&b[..len]).is_err(),
            "truncation to {len} accepted in pieces"
        );
    }
    // Appending is refused as well.
    let mut c = b.clone();
    c.push(0);
    assert!(validate(&c).is_err());
    assert!(stream(&c).is_err());
}

#[test]
fn wrong_magic_and_version_are_refused_before_the_checksum() {
    let mut b = sample_image().to_bytes();
    b[0] = b'X';
    assert!(matches!(validate(&b), Err(StateError::BadMagic { .. })));
    let mut b = sample_image().to_bytes();
    // A version-2 image (pages right after their heads, none aligned) is refused by
    // its number.
    b[8] = 2;
    reseal(&mut b);
    assert_eq!(
        validate(&b),
        Err(StateError::BadVersion { got: 2, want: 3 })
    );
    assert!(stream(&b).unwrap_err().to_string().contains("same release"));
}

/// Reads `b` as LOAD does, in pieces: the decoded parts and the pages handed on.
fn stream(b: &[u8]) -> Result<(Staged, Vec<PageImage>), StateError> {
    let mut read = |at: usize, buf: &mut [u8]| -> Result<(), ()> {
        let end = at
            .checked_add(buf.len())
            .filter(|&e| e <= b.len())
            .ok_or(())?;
        buf.copy_from_slice(&b[at..end]);
        Ok(())
    };
    let unwrap = |e: StreamError<()>| match e {
        StreamError::Image(e) => e,
        StreamError::Read(()) => panic!("read outside the image"),
    };
    let staged = Staged::open(b.len(), &mut read).map_err(unwrap)?;
    let mut pages = Vec::new();
    let n = staged
        .pages(&mut read, |batch| {
            for &(index, data) in batch {
                pages.push(PageImage {
                    index,
                    data: data.into(),
                })
            }
        })
        .map_err(unwrap)?;
    assert_eq!(n, pages.len());
    assert_eq!(n, staged.pages);
    Ok((staged, pages))
}

#[test]
fn an_image_read_in_pieces_decodes_as_the_whole() {
    let img = sample_image();
    let (s, pages) = stream(&img.to_bytes()).unwrap();
    assert_eq!(
        (s.header, &s.hca, s.iseg, &s.objects, &pages),
        (img.header, &img.hca, img.iseg, &img.objects, &img.pages)
    );
    // A large one: many runs of STREAM_RUN, a last one shorter.
    let mut big = sample_image();
    big.header.dev_mem_size = 4 << 20;
    big.pages = (0..200u32)
        .map(|i| PageImage {
            index: 1000 - i * 3,
            data: vec![(i % 251) as u8; 4096].into(),
        })
        .collect();
    let b = big.to_bytes();
    assert_eq!(validate(&b).unwrap(), big);
    assert_eq!(stream(&b).unwrap().1, big.pages);
    // A page entry gone bad in the last run, behind a good checksum: refused at it.
    let mut parsed = big.clone();
    parsed.pages[199].index = parsed.pages[3].index;
    let want = Err(codec::bad(
        "page index",
        parsed.pages[3].index.into(),
        "each page once",
    ));
    assert_eq!(stream(&parsed.to_bytes()).map(|_| ()), want);
    assert_eq!(validate(&parsed.to_bytes()).map(|_| ()), want);
}

/// Adds a 4th section of `len` bytes with `tag` and `flags` at the end of the payload.
fn with_extra_section(tag_v: u16, flags: u16) -> Vec<u8> {
    let img = sample_image();
    let b = img.to_bytes();
    let body = &b[..b.len() - CHECKSUM_LEN];
    let payload = &body[HEADER_LEN + SECTIONS_WRITTEN.len() * SECTION_ENTRY_LEN..];
    let mut out = Vec::new();
    out.extend_from_slice(&body[..HEADER_LEN]);
    out[12..14].copy_from_slice(&(SECTIONS_WRITTEN.len() as u16 + 1).to_le_bytes());
    // The sections move by a whole page (the table's new entry, then zeros), so the
    // pages stay on 4 KiB image offsets.
    let shift = 4096u64;
    for i in 0..SECTIONS_WRITTEN.len() {
        let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
        let mut e = body[at..at + SECTION_ENTRY_LEN].to_vec();
        let off = le64(&e, 8) + shift;
        e[8..16].copy_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&e);
    }
    let extra_off =
        (HEADER_LEN + SECTIONS_WRITTEN.len() * SECTION_ENTRY_LEN + 4096 + payload.len()) as u64;
    let mut e = SectionEntry::new_zeroed();
    e.tag.set(tag_v);
    e.flags.set(flags);
    e.offset.set(extra_off);
    e.length.set(4);
    out.extend_from_slice(e.as_bytes());
    out.resize(out.len() + 4096 - SECTION_ENTRY_LEN, 0);
    out.extend_from_slice(payload);
    out.extend_from_slice(&[1, 2, 3, 4]);
    let total = (out.len() + CHECKSUM_LEN) as u64;
    out[16..24].copy_from_slice(&total.to_le_bytes());
    out.extend_from_slice(&[0; CHECKSUM_LEN]);
    reseal(&mut out);
    out
}

#[test]
fn unknown_mandatory_section_is_refused_and_optional_one_skipped() {
    let b = with_extra_section(0x77, SECTION_MANDATORY);
    assert_eq!(
        validate(&b),
        Err(StateError::UnknownMandatory { tag: 0x77 })
    );
    let b = with_extra_section(0x77, 0);
    assert_eq!(validate(&b).unwrap(), sample_image());
    let b = with_extra_section(SectionTag::Hca.into(), SECTION_MANDATORY);
    assert!(validate(&b).is_err(), "duplicate HCA section");
}

#[test]
fn oversized_lengths_and_counts_are_refused_without_allocating() {
    // A section length past the end.
    let mut b = sample_image().to_bytes();
    let at = HEADER_LEN + 2 * SECTION_ENTRY_LEN + 16;
    b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    reseal(&mut b);
    assert!(matches!(
        validate(&b),
        Err(StateError::SectionBounds { .. })
    ));
    // Overlapping sections.
    let mut b = sample_image().to_bytes();
    let at = HEADER_LEN + SECTION_ENTRY_LEN + 8;
    let off = le64(&b, at) - 4;
    b[at..at + 8].copy_from_slice(&off.to_le_bytes());
    reseal(&mut b);
    assert!(validate(&b).is_err());
    // The UAR count (first u32 of OBJECTS) claims 2^32 - 1 entries.
    let mut b = sample_image().to_bytes();
    let objects_at = le64(&b, HEADER_LEN + 2 * SECTION_ENTRY_LEN + 8) as usize;
    b[objects_at..objects_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut b);
    assert!(matches!(validate(&b), Err(StateError::Truncated { .. })));
    // total_len disagrees with what came.
    let mut b = sample_image().to_bytes();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    reseal(&mut b);
    assert!(matches!(
        validate(&b),
        Err(StateError::LengthMismatch { .. })
    ));
    // An image above the cap is refused on its length alone.
    assert!(matches!(
        validate(&vec![0u8; MAX_IMAGE_LEN + 1]),
        Err(StateError::BadLength { .. })
    ));
    // Too many sections.
    let mut b = sample_image().to_bytes();
    b[12..14].copy_from_slice(&1000u16.to_le_bytes());
    reseal(&mut b);
    assert!(validate(&b).is_err());
}

#[test]
fn page_indices_are_checked() {
    let mut img = sample_image();
    img.pages[1].index = 8; // 32 KiB = pages 0..8
    assert!(validate(&img.to_bytes()).is_err());
    let mut img = sample_image();
    img.pages[1].index = 0;
    assert!(validate(&img.to_bytes()).is_err(), "duplicate page");
    let mut img = sample_image();
    img.header.kind = ImageKind::Delta;
    assert!(
        validate(&img.to_bytes()).is_err(),
        "delta with base_seq >= seq"
    );
    img.header.seq = 3;
    img.header.base_seq = 2;
    assert!(validate(&img.to_bytes()).is_ok());
}

/// The image with one edit; `validate` must refuse it with `want`.
fn refused(edit: impl FnOnce(&mut Image), want: StateError) {
    let mut img = sample_image();
    edit(&mut img);
    assert_eq!(validate(&img.to_bytes()), Err(want));
}

#[test]
fn objects_failing_a_live_validator_are_refused_with_the_live_reason() {
    use crate::firmware::checks::*;
    // CREATE_EQ's eqc check: log_eq_size above log_max_eq_sz (the same error the live
    // command turns into its status, see firmware::eq's tests).
    let reason = check_eqc(17, 0, 0, 0).unwrap_err();
    assert!(matches!(reason, EqError::LogSize { got: 17, .. }));
    refused(
        |i| {
            i.objects.eqs[0].log_size = 17;
        },
        StateError::Eq {
            eqn: 1,
            source: reason,
        },
    );
    // CREATE_EQ: the doorbell UAR must be allocated.
    refused(
        |i| i.objects.eqs[0].uar = 5,
        StateError::Eq {
            eqn: 1,
            source: check_eq_uar(&[3, 4].into(), 5).unwrap_err(),
        },
    );
    // CREATE_EQ: an MSI-X vector the function does not have.
    refused(
        |i| i.objects.eqs[0].intr = 4000,
        StateError::Eq {
            eqn: 1,
            source: check_eqc(6, 0, 4000, 0).unwrap_err(),
        },
    );
    // CREATE_EQ: a misaligned page.
    refused(
        |i| i.objects.eqs[0].pas[0] = 0x10_0010,
        StateError::Eq {
            eqn: 1,
            source: EqError::BadPage {
                index: 0,
                pa: 0x10_0010,
            },
        },
    );
    // CREATE_MKEY: a length beyond the MTT (three pages, two entries).
    let reason = check_mtt_len(2, 3).unwrap_err();
    assert_eq!(reason, PdMkeyError::MttShort { have: 2, needed: 3 });
    refused(
        |i| i.objects.mkeys[0].len = 3 * 4096,
        StateError::Mkey {
            index: 1,
            source: reason,
        },
    );
    // CREATE_MKEY: a PD that is not allocated, a page size it does not take.
    refused(
        |i| i.objects.mkeys[0].pd = 2,
        StateError::Mkey {
            index: 1,
            source: PdMkeyError::NoPd { pd: 2 },
        },
    );
    refused(
        |i| i.objects.mkeys[0].log_page_size = 11,
        StateError::Mkey {
            index: 1,
            source: check_mkey_range(11, 0, 8192).unwrap_err(),
        },
    );
    // ALLOC_UAR's and ALLOC_PD's ranges.
    refused(
        |i| i.objects.uars.push(2),
        StateError::Uar(UarError::OutOfRange { index: 2 }),
    );
    refused(
        |i| i.objects.pds.push(0),
        StateError::Pd(check_pd_index(0).unwrap_err()),
    );
    // MANAGE_PAGES: a misaligned page; INIT_HCA: an initialized HCA without its pages.
    refused(
        |i| i.objects.fw_pages[0] = 0x1001,
        StateError::FwPage(PageError::BadAddress { pa: 0x1001 }),
    );
    refused(
        |i| i.objects.fw_pages.truncate(4),
        StateError::FwPage(check_startup_pages(4).unwrap_err()),
    );
    // CREATE_CQ: an EQ that does not exist, one that takes no completions; CREATE_QP: a
    // CQ that does not exist, a PAS list shorter than the buffer; a connected QP
    // without its peer.
    refused(
        |i| i.objects.cqs[0].eqn = 3,
        StateError::Queue {
            what: "CQ",
            id: 1,
            source: crate::firmware::QueueError::NoEq { eqn: 3 },
        },
    );
    refused(
        |i| i.objects.cqs[0].eqn = 1,
        StateError::Queue {
            what: "CQ",
            id: 1,
            source: crate::firmware::QueueError::NotCompletionEq { eqn: 1 },
        },
    );
    refused(
        |i| i.objects.qps[0].cqn_snd = 7,
        StateError::Queue {
            what: "QP",
            id: 2,
            source: crate::firmware::QueueError::NoCq { cqn: 7 },
        },
    );
    refused(
        |i| i.objects.qps[0].log_sq_size = 7,
        StateError::Queue {
            what: "QP",
            id: 2,
            source: crate::firmware::QueueError::PasCount { have: 1, needed: 3 },
        },
    );
    refused(
        |i| i.objects.qps[0].peer = None,
        StateError::BadValue {
            what: "QP peer",
            got: 0,
            want: "a peer for a QP past INIT2RTR",
        },
    );
    // SET_ISSI and SET_HCA_CAP.
    refused(
        |i| i.hca.issi = 7,
        StateError::Hca(check_issi(7).unwrap_err()),
    );
    let mut caps = sample_image().hca.caps.to_vec();
    mlx5_prm::ifc::set(&mut caps, mlx5_prm::cmd::caps::cmd_hca_cap::LOG_MAX_QP, 31);
    let reason = check_general_caps(&caps).unwrap_err();
    assert!(matches!(reason, CapsError::AboveMax { value: 31, .. }));
    refused(|i| i.hca.caps = caps.into(), StateError::Caps(reason));
}

#[test]
fn objects_the_firmware_could_not_hold_are_refused() {
    // Two EQs taking command events, or a command EQ that takes none.
    refused(
        |i| {
            let mut second = i.objects.eqs[0].clone();
            second.eqn = 2;
            i.objects.eqs.push(second);
        },
        StateError::Eq {
            eqn: 2,
            source: EqError::SecondCmdEq,
        },
    );
    let mut img = sample_image();
    img.objects.cmd_eq = None;
    assert!(matches!(
        validate(&img.to_bytes()),
        Err(StateError::BadValue {
            what: "command EQ",
            ..
        })
    ));
    // Duplicates and numbers the firmware never hands out.
    for edit in [
        (|i: &mut Image| i.objects.uars.push(3)) as fn(&mut Image),
        |i| i.objects.pds.push(1),
        |i| i.objects.fw_pages.push(0x1000),
        |i| i.objects.eqs[0].eqn = 0,
        |i| i.objects.mkeys[0].index = 0,
        |i| i.objects.mkeys[0].mtt.push(0x40_0000),
        |i| i.objects.mkeys[0].mtt[0] |= 1,
        |i| i.objects.eqs[0].page_size = 4096 * 3,
        |i| i.objects.eqs[0].ci = 1 << 24,
    ] {
        let mut img = sample_image();
        edit(&mut img);
        assert!(validate(&img.to_bytes()).is_err(), "{:?}", img.objects);
    }
}
