//! The initialization segment (`struct mlx5_init_seg`, BAR0 + 0 .. 0x2010).
//!
//! Every register is a 32-bit big-endian word described by one row of [`REGISTERS`]:
//! offset, reset value, guest-writable mask, write-1-to-clear mask and kind (where its
//! value comes from and what a write does). Offsets not in the table are reserved: they
//! read 0 and drop writes. Byte-granular access is built on top of this by `Bar0`,
//! which hands this module whole words plus a mask of the bytes actually written.
//!
//! Every offset, field and mask comes from `mlx5_prm::iseg` (the one codec of the
//! layout, shared with the driver); this table only adds what the device decides: the
//! reset values, what a guest may write and what a write does.

use std::time::{Duration, Instant};

use mlx5_prm::iseg::HealthBuffer;
pub use mlx5_prm::iseg::{
    CLR_INTX_OFFSET, CMDIF_REV, CMDIF_REV_FW_SUB_OFFSET, CMDIF_REV_SHIFT, CMDQ_ADDR_H_OFFSET,
    CMDQ_ADDR_L_MASK, CMDQ_ADDR_L_SZ_OFFSET, CMDQ_LOG_SIZE_DEFAULT, CMDQ_LOG_SIZE_SHIFT,
    CMDQ_LOG_STRIDE_DEFAULT, CMDQ_LOG_STRIDE_SHIFT, CMD_DBELL_OFFSET, CMD_EXEC_TO_OFFSET,
    CMD_Q_INIT_TO_OFFSET, FW_REV_MINOR_SHIFT, FW_REV_OFFSET, HEALTH_ASSERT_CALLRA_OFFSET,
    HEALTH_ASSERT_EXIT_PTR_OFFSET, HEALTH_ASSERT_VAR_OFFSET, HEALTH_COUNTER_OFFSET,
    HEALTH_EXT_SYND_OFFSET, HEALTH_FW_VER_OFFSET, HEALTH_HW_ID_OFFSET, HEALTH_IRISC_INDEX_OFFSET,
    HEALTH_OFFSET, HEALTH_RFR_SEVERITY_OFFSET, HEALTH_SIZE, HEALTH_SYND_OFFSET, HEALTH_TIME_OFFSET,
    IEEE1588_CLK_OFFSET, IEEE1588_CLK_TYPE_OFFSET, INITIALIZING_BUSY_MASK, INITIALIZING_OFFSET,
    INTERNAL_TIMER_H_OFFSET, INTERNAL_TIMER_L_OFFSET, ISEG_SIZE, NIC_INTERFACE_MASK,
    NIC_INTERFACE_SHIFT, REAL_TIME_H_OFFSET, REAL_TIME_L_OFFSET,
};

use super::Bar0Effect;
use RegKind::*;

// Firmware identity. fw_rev = minor<<16 | major (fw_rev_maj/fw_rev_min);
// cmdif_rev_fw_sub = CMD_IF_REV<<16 | subminor (cmdif_rev/fw_rev_sub).
pub const FW_VER_MAJOR: u32 = 22;
pub const FW_VER_MINOR: u32 = 39;
pub const FW_VER_SUBMINOR: u32 = 1002;
pub const FW_REV: u32 = FW_VER_MINOR << FW_REV_MINOR_SHIFT | FW_VER_MAJOR;
pub const CMDIF_REV_FW_SUB: u32 = (CMDIF_REV as u32) << CMDIF_REV_SHIFT | FW_VER_SUBMINOR;
/// health.fw_ver as print_health_info decodes it: major\[31:24\] minor\[23:16\] sub\[15:0\].
/// Anything but 0xffffffff (sensor_pci_not_working).
pub const HEALTH_FW_VER: u32 = FW_VER_MAJOR << 24 | FW_VER_MINOR << 16 | FW_VER_SUBMINOR;

/// The queue geometry reported in `cmdq_addr_l_sz` (0x56: 32 entries of 64 bytes).
pub const CMDQ_GEOMETRY: u32 =
    CMDQ_LOG_SIZE_DEFAULT << CMDQ_LOG_SIZE_SHIFT | CMDQ_LOG_STRIDE_DEFAULT << CMDQ_LOG_STRIDE_SHIFT;

/// Offset of the 4-byte register word holding byte `offset`.
const fn word_of(offset: u64) -> u64 {
    offset & !3
}

/// Shift of the byte at `offset` inside its big-endian register word.
const fn byte_shift(offset: u64) -> u32 {
    (3 - (offset % 4) as u32) * 8
}

/// The word carrying `irisc_index`, `synd` and `ext_synd` (health buffer + 0x3c).
const HEALTH_SYND_WORD_OFFSET: u64 = word_of(HEALTH_SYND_OFFSET);
const HEALTH_SYND_SHIFT: u32 = byte_shift(HEALTH_SYND_OFFSET);
const HEALTH_SYND_MASK: u32 = 0xff << HEALTH_SYND_SHIFT;
/// `ext_synd` is the be16 at the end of the word.
const HEALTH_EXT_SYND_SHIFT: u32 = byte_shift(HEALTH_EXT_SYND_OFFSET + 1);
const HEALTH_EXT_SYND_MASK: u32 = 0xffff << HEALTH_EXT_SYND_SHIFT;
/// `rfr_severity` is the first byte of its word.
const HEALTH_RFR_SEVERITY_SHIFT: u32 = byte_shift(HEALTH_RFR_SEVERITY_OFFSET);
const HEALTH_RFR_SEVERITY_MASK: u32 = 0xff << HEALTH_RFR_SEVERITY_SHIFT;

/// BAR0 offset of a health-buffer field (`offset_of!` in `HealthBuffer`).
macro_rules! health {
    ($field:ident) => {
        HEALTH_OFFSET + core::mem::offset_of!(HealthBuffer, $field) as u64
    };
}

const _: () = {
    assert!(HEALTH_SYND_WORD_OFFSET == HEALTH_IRISC_INDEX_OFFSET);
    assert!(word_of(HEALTH_EXT_SYND_OFFSET) == HEALTH_SYND_WORD_OFFSET);
    assert!(health!(time) == HEALTH_TIME_OFFSET);
    assert!(health!(hw_id) == HEALTH_HW_ID_OFFSET);
};

/// health_counter advances by one per tick (poll_health wants it to keep moving).
pub const HEALTH_COUNTER_TICK: Duration = Duration::from_millis(1);
/// health_counter value at power on; wait_vital rejects 0.
pub const HEALTH_COUNTER_START: u32 = 1;

/// Where a register's value comes from and what a guest write does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegKind {
    /// Held in storage; writes apply the writable / write-1-to-clear masks.
    Stored,
    /// Stored `cmdq_addr_l_sz`; writes report `CmdqAddress` and `NicInterface`.
    CmdqAddrLow,
    /// Reads 0; a write reports `CommandDoorbell` with the written bits.
    Doorbell,
    /// Reads 0; writes are accepted and dropped (clr_intx: no INTx with MSI-X).
    WriteIgnored,
    /// Computed from the device clock, read-only.
    TimerHigh,
    TimerLow,
    HealthCounter,
}

/// One row of the register table.
#[derive(Clone, Copy, Debug)]
pub struct IsegReg {
    pub offset: u64,
    pub name: &'static str,
    pub reset: u32,
    /// Bits a guest write may change.
    pub writable: u32,
    /// Bits a guest clears by writing 1 (none in the iseg today; kept for the table shape).
    pub w1c: u32,
    pub kind: RegKind,
}

const fn reg(
    offset: u64,
    name: &'static str,
    reset: u32,
    writable: u32,
    w1c: u32,
    kind: RegKind,
) -> IsegReg {
    IsegReg {
        offset,
        name,
        reset,
        writable,
        w1c,
        kind,
    }
}

/// The init segment register table, sorted by offset. Columns: offset, name, reset,
/// writable, w1c, kind. No iseg register is write-1-to-clear today.
#[rustfmt::skip]
pub const REGISTERS: &[IsegReg] = &[
    //  offset                                  name                          reset             writable                               w1c kind
    reg(FW_REV_OFFSET,                          "fw_rev",                     FW_REV,           0,                                     0, Stored),
    reg(CMDIF_REV_FW_SUB_OFFSET,                "cmdif_rev_fw_sub",           CMDIF_REV_FW_SUB, 0,                                     0, Stored),
    reg(CMDQ_ADDR_H_OFFSET,                     "cmdq_addr_h",                0,                u32::MAX,                              0, Stored),
    reg(CMDQ_ADDR_L_SZ_OFFSET,                  "cmdq_addr_l_sz",             CMDQ_GEOMETRY,    CMDQ_ADDR_L_MASK | NIC_INTERFACE_MASK, 0, CmdqAddrLow),
    reg(CMD_DBELL_OFFSET,                       "cmd_dbell",                  0,                u32::MAX,                              0, Doorbell),
    reg(INITIALIZING_OFFSET,                    "initializing",               0,                0,                                     0, Stored),
    reg(HEALTH_ASSERT_VAR_OFFSET,               "health.assert_var0",         0,                0,                                     0, Stored),
    reg(HEALTH_ASSERT_VAR_OFFSET + 4,           "health.assert_var1",         0,                0,                                     0, Stored),
    reg(HEALTH_ASSERT_VAR_OFFSET + 8,           "health.assert_var2",         0,                0,                                     0, Stored),
    reg(HEALTH_ASSERT_VAR_OFFSET + 12,          "health.assert_var3",         0,                0,                                     0, Stored),
    reg(HEALTH_ASSERT_VAR_OFFSET + 16,          "health.assert_var4",         0,                0,                                     0, Stored),
    reg(HEALTH_ASSERT_VAR_OFFSET + 20,          "health.assert_var5",         0,                0,                                     0, Stored),
    reg(health!(rsvd0),                         "health.rsvd0_0",             0,                0,                                     0, Stored),
    reg(health!(rsvd0) + 4,                     "health.rsvd0_1",             0,                0,                                     0, Stored),
    reg(HEALTH_ASSERT_EXIT_PTR_OFFSET,          "health.assert_exit_ptr",     0,                0,                                     0, Stored),
    reg(HEALTH_ASSERT_CALLRA_OFFSET,            "health.assert_callra",       0,                0,                                     0, Stored),
    reg(health!(rsvd1),                         "health.rsvd1",               0,                0,                                     0, Stored),
    reg(HEALTH_TIME_OFFSET,                     "health.time",                0,                0,                                     0, Stored),
    reg(HEALTH_FW_VER_OFFSET,                   "health.fw_ver",              HEALTH_FW_VER,    0,                                     0, Stored),
    reg(HEALTH_HW_ID_OFFSET,                    "health.hw_id",               0,                0,                                     0, Stored),
    reg(HEALTH_RFR_SEVERITY_OFFSET,             "health.rfr_severity",        0,                0,                                     0, Stored),
    reg(HEALTH_SYND_WORD_OFFSET,                "health.irisc_synd_ext_synd", 0,                0,                                     0, Stored),
    reg(CMD_EXEC_TO_OFFSET,                     "cmd_exec_to",                0,                0,                                     0, Stored),
    reg(CMD_Q_INIT_TO_OFFSET,                   "cmd_q_init_to",              0,                0,                                     0, Stored),
    reg(INTERNAL_TIMER_H_OFFSET,                "internal_timer_h",           0,                0,                                     0, TimerHigh),
    reg(INTERNAL_TIMER_L_OFFSET,                "internal_timer_l",           0,                0,                                     0, TimerLow),
    reg(HEALTH_COUNTER_OFFSET,                  "health_counter",             0,                0,                                     0, HealthCounter),
    reg(REAL_TIME_H_OFFSET,                     "real_time_h",                0,                0,                                     0, Stored),
    reg(REAL_TIME_L_OFFSET,                     "real_time_l",                0,                0,                                     0, Stored),
    reg(IEEE1588_CLK_OFFSET,                    "ieee1588_clk_h",             0,                0,                                     0, Stored),
    reg(IEEE1588_CLK_OFFSET + 4,                "ieee1588_clk_l",             0,                0,                                     0, Stored),
    reg(IEEE1588_CLK_TYPE_OFFSET,               "ieee1588_clk_type",          0,                0,                                     0, Stored),
    reg(CLR_INTX_OFFSET,                        "clr_intx",                   0,                u32::MAX,                              0, WriteIgnored),
];

const NREGS: usize = REGISTERS.len();

fn index_of(offset: u64) -> Option<usize> {
    REGISTERS.binary_search_by_key(&offset, |r| r.offset).ok()
}

/// Register state of one init segment.
#[derive(Debug)]
pub struct Iseg {
    values: [u32; NREGS],
    /// Origin of internal_timer; survives reset (the clock keeps running).
    clock_epoch: Instant,
    /// health_counter = base + ticks since epoch, or the frozen value.
    health_base: u32,
    health_epoch: Instant,
    health_frozen: Option<u32>,
}

impl Iseg {
    pub fn new() -> Self {
        let now = Instant::now();
        Iseg {
            values: reset_values(),
            clock_epoch: now,
            health_base: HEALTH_COUNTER_START,
            health_epoch: now,
            health_frozen: None,
        }
    }

    /// Power-on state of every register; the internal timer keeps running.
    pub fn reset(&mut self) {
        self.values = reset_values();
        self.health_base = HEALTH_COUNTER_START;
        self.health_epoch = Instant::now();
        self.health_frozen = None;
    }

    /// The value of the register word at `offset` (4-byte aligned) at time `now`.
    pub fn read(&self, offset: u64, now: Instant) -> u32 {
        let Some(i) = index_of(offset) else { return 0 };
        match REGISTERS[i].kind {
            RegKind::Stored | RegKind::CmdqAddrLow => self.values[i],
            RegKind::Doorbell | RegKind::WriteIgnored => 0,
            RegKind::TimerHigh => (self.internal_timer(now) >> 32) as u32,
            RegKind::TimerLow => self.internal_timer(now) as u32,
            RegKind::HealthCounter => self.health_counter(now),
        }
    }

    /// A guest write of `value` to the word at `offset`; only bits in `bytes` (a mask of
    /// the bytes actually written) are meant. Side effects are appended to `effects`.
    pub fn write(&mut self, offset: u64, value: u32, bytes: u32, effects: &mut Vec<Bar0Effect>) {
        let Some(i) = index_of(offset) else { return };
        let r = &REGISTERS[i];
        tracing::trace!(offset, reg = r.name, value, bytes, "iseg write");
        match r.kind {
            RegKind::Stored | RegKind::CmdqAddrLow => {
                let old = self.values[i];
                let set = r.writable & bytes;
                let clear = r.w1c & bytes & value;
                self.values[i] = ((old & !set) | (value & set)) & !clear;
                if r.kind == RegKind::CmdqAddrLow {
                    if bytes & CMDQ_ADDR_L_MASK != 0 {
                        effects.push(Bar0Effect::CmdqAddress(self.cmdq_address()));
                    }
                    if (old ^ self.values[i]) & NIC_INTERFACE_MASK != 0 {
                        effects.push(Bar0Effect::NicInterface(self.nic_interface()));
                    }
                }
            }
            RegKind::Doorbell => {
                let mask = value & bytes;
                if mask != 0 {
                    effects.push(Bar0Effect::CommandDoorbell(mask));
                }
            }
            RegKind::WriteIgnored
            | RegKind::TimerHigh
            | RegKind::TimerLow
            | RegKind::HealthCounter => {}
        }
    }

    /// Free-running nanosecond clock (internal_timer_h:l).
    pub fn internal_timer(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.clock_epoch).as_nanos() as u64
    }

    pub fn health_counter(&self, now: Instant) -> u32 {
        if let Some(v) = self.health_frozen {
            return v;
        }
        let ticks = now.saturating_duration_since(self.health_epoch).as_nanos()
            / HEALTH_COUNTER_TICK.as_nanos();
        self.health_base.wrapping_add(ticks as u32)
    }

    /// Stop (true) or restart (false) the health counter; it resumes from where it froze.
    pub fn freeze_health_counter(&mut self, frozen: bool) {
        let now = Instant::now();
        match (frozen, self.health_frozen) {
            (true, None) => self.health_frozen = Some(self.health_counter(now)),
            (false, Some(v)) => {
                self.health_base = v;
                self.health_epoch = now;
                self.health_frozen = None;
            }
            _ => {}
        }
    }

    fn value_mut(&mut self, offset: u64) -> Option<&mut u32> {
        index_of(offset).map(|i| &mut self.values[i])
    }

    fn value(&self, offset: u64) -> u32 {
        index_of(offset).map_or(0, |i| self.values[i])
    }

    /// Full 64-bit command queue address as last written (low 12 bits zero).
    pub fn cmdq_address(&self) -> u64 {
        u64::from(self.value(CMDQ_ADDR_H_OFFSET)) << 32
            | u64::from(self.value(CMDQ_ADDR_L_SZ_OFFSET) & CMDQ_ADDR_L_MASK)
    }

    pub fn nic_interface(&self) -> u8 {
        mlx5_prm::iseg::nic_interface_bits(self.value(CMDQ_ADDR_L_SZ_OFFSET))
    }

    /// Device-side change of the nic_interface state (fatal/recovery flows).
    pub fn set_nic_interface(&mut self, state: u8) {
        if let Some(v) = self.value_mut(CMDQ_ADDR_L_SZ_OFFSET) {
            *v = (*v & !NIC_INTERFACE_MASK)
                | (u32::from(state) << NIC_INTERFACE_SHIFT & NIC_INTERFACE_MASK);
        }
    }

    /// health.synd and health.ext_synd; irisc_index is kept.
    pub fn set_health_syndrome(&mut self, synd: u8, ext_synd: u16) {
        if let Some(v) = self.value_mut(HEALTH_SYND_WORD_OFFSET) {
            *v = (*v & !(HEALTH_SYND_MASK | HEALTH_EXT_SYND_MASK))
                | u32::from(synd) << HEALTH_SYND_SHIFT
                | u32::from(ext_synd) << HEALTH_EXT_SYND_SHIFT;
        }
    }

    /// health.rfr_severity (RFR bit 7, CRR bit 6, severity valid bit 3, severity 2:0).
    pub fn set_rfr_severity(&mut self, rfr_severity: u8) {
        if let Some(v) = self.value_mut(HEALTH_RFR_SEVERITY_OFFSET) {
            *v = (*v & !HEALTH_RFR_SEVERITY_MASK)
                | u32::from(rfr_severity) << HEALTH_RFR_SEVERITY_SHIFT;
        }
    }

    /// Restore the whole health buffer to its power-on contents.
    pub fn clear_health(&mut self) {
        for (i, r) in REGISTERS.iter().enumerate() {
            if (HEALTH_OFFSET..HEALTH_OFFSET + HEALTH_SIZE as u64).contains(&r.offset) {
                self.values[i] = r.reset;
            }
        }
    }

    /// Set or clear the `initializing` busy bit (bit 31) for the pre-init handshake.
    pub fn set_initializing(&mut self, busy: bool) {
        if let Some(v) = self.value_mut(INITIALIZING_OFFSET) {
            *v = if busy {
                *v | INITIALIZING_BUSY_MASK
            } else {
                *v & !INITIALIZING_BUSY_MASK
            };
        }
    }
}

impl Default for Iseg {
    fn default() -> Self {
        Self::new()
    }
}

fn reset_values() -> [u32; NREGS] {
    let mut v = [0; NREGS];
    for (slot, r) in v.iter_mut().zip(REGISTERS) {
        *slot = r.reset;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx5_prm::iseg::{NicInterface, HEALTH_RFR_MASK, INITIALIZING_ECPU_MASK};

    #[test]
    fn table_is_sorted_aligned_and_inside_iseg() {
        for w in REGISTERS.windows(2) {
            assert!(
                w[0].offset < w[1].offset,
                "{} before {}",
                w[0].name,
                w[1].name
            );
        }
        for r in REGISTERS {
            assert_eq!(r.offset % 4, 0, "{}", r.name);
            assert!(r.offset < ISEG_SIZE, "{}", r.name);
            assert!(
                !(r.offset..r.offset + 4).contains(&HEALTH_SYND_OFFSET)
                    || r.offset == HEALTH_SYND_WORD_OFFSET
            );
            assert_eq!(r.reset & r.w1c, 0, "{}", r.name);
        }
        for off in [
            CMDQ_ADDR_L_SZ_OFFSET,
            HEALTH_SYND_WORD_OFFSET,
            INITIALIZING_OFFSET,
        ] {
            assert!(index_of(off).is_some());
        }
        assert_eq!(HEALTH_SYND_WORD_OFFSET + 1, HEALTH_SYND_OFFSET);
        assert_eq!(HEALTH_SYND_WORD_OFFSET + 2, HEALTH_EXT_SYND_OFFSET);
    }

    #[test]
    fn identity_registers_hold_firmware_version() {
        let s = Iseg::new();
        let now = Instant::now();
        assert_eq!(s.read(FW_REV_OFFSET, now), 39 << 16 | 22);
        assert_eq!(s.read(CMDIF_REV_FW_SUB_OFFSET, now) >> 16, 5);
        assert_eq!(s.read(CMDIF_REV_FW_SUB_OFFSET, now) & 0xffff, 1002);
        assert_ne!(s.read(HEALTH_FW_VER_OFFSET, now), u32::MAX);
        assert_eq!(
            s.read(INITIALIZING_OFFSET, now) & (INITIALIZING_BUSY_MASK | INITIALIZING_ECPU_MASK),
            0
        );
    }

    #[test]
    fn rfr_severity_and_initializing_hooks() {
        let mut s = Iseg::new();
        let now = Instant::now();
        s.set_rfr_severity(HEALTH_RFR_MASK | 0x8 | 3);
        assert_eq!(s.read(HEALTH_RFR_SEVERITY_OFFSET, now) >> 24, 0x8b);
        s.set_initializing(true);
        assert_eq!(s.read(INITIALIZING_OFFSET, now), INITIALIZING_BUSY_MASK);
        s.set_initializing(false);
        assert_eq!(s.read(INITIALIZING_OFFSET, now), 0);
        s.set_nic_interface(NicInterface::SwReset.into());
        assert_eq!(s.nic_interface(), u8::from(NicInterface::SwReset));
        assert_eq!(s.read(CMDQ_ADDR_L_SZ_OFFSET, now), 0x756);
        s.clear_health();
        assert_eq!(s.read(HEALTH_RFR_SEVERITY_OFFSET, now), 0);
    }

    #[test]
    fn internal_timer_advances() {
        let s = Iseg::new();
        let t0 = Instant::now();
        let a = s.internal_timer(t0);
        let b = s.internal_timer(t0 + Duration::from_micros(5));
        assert_eq!(b - a, 5_000);
    }
}
