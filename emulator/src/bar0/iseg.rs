//! The initialization segment (`struct mlx5_init_seg`, BAR0 + 0 .. 0x2010).
//!
//! Every register is a 32-bit big-endian word described by one row of [`REGISTERS`]:
//! offset, reset value, guest-writable mask, write-1-to-clear mask and kind (where its
//! value comes from and what a write does). Offsets not in the table are reserved: they
//! read 0 and drop writes. Byte-granular access is built on top of this by `Bar0`,
//! which hands this module whole words plus a mask of the bytes actually written.
//!
//! Offsets are defined locally (not taken from `mlx5-prm`) so that this module does not
//! depend on a crate being written in parallel; the names mirror the kernel's.

use std::time::{Duration, Instant};

use super::Bar0Effect;
use RegKind::*;

// Register offsets, `struct mlx5_init_seg` (include/linux/mlx5/device.h).
pub const FW_REV_OFFSET: u32 = 0x0000; // fw_rev
pub const CMDIF_REV_FW_SUB_OFFSET: u32 = 0x0004; // cmdif_rev_fw_sub
pub const CMDQ_ADDR_H_OFFSET: u32 = 0x0010; // cmdq_addr_h
pub const CMDQ_ADDR_L_SZ_OFFSET: u32 = 0x0014; // cmdq_addr_l_sz
pub const CMD_DBELL_OFFSET: u32 = 0x0018; // cmd_dbell
pub const INITIALIZING_OFFSET: u32 = 0x01fc; // initializing
pub const HEALTH_OFFSET: u32 = 0x0200; // health (struct health_buffer)
pub const HEALTH_SIZE: u32 = 0x40; // sizeof(struct health_buffer)
pub const HEALTH_FW_VER_OFFSET: u32 = 0x0230; // health.fw_ver
pub const HEALTH_RFR_SEVERITY_OFFSET: u32 = 0x0238; // health.rfr_severity (u8) + rsvd2[3]
pub const HEALTH_SYND_WORD_OFFSET: u32 = 0x023c; // health.irisc_index, synd, ext_synd
pub const HEALTH_SYND_OFFSET: u32 = 0x023d; // health.synd (u8)
pub const HEALTH_EXT_SYND_OFFSET: u32 = 0x023e; // health.ext_synd (be16)
pub const CMD_EXEC_TO_OFFSET: u32 = 0x0ff8; // cmd_exec_to
pub const CMD_Q_INIT_TO_OFFSET: u32 = 0x0ffc; // cmd_q_init_to
pub const INTERNAL_TIMER_H_OFFSET: u32 = 0x1000; // internal_timer_h
pub const INTERNAL_TIMER_L_OFFSET: u32 = 0x1004; // internal_timer_l
pub const HEALTH_COUNTER_OFFSET: u32 = 0x1010; // health_counter
pub const REAL_TIME_H_OFFSET: u32 = 0x1040; // real_time_h
pub const REAL_TIME_L_OFFSET: u32 = 0x1044; // real_time_l
pub const IEEE1588_CLK_H_OFFSET: u32 = 0x2000; // ieee1588_clk (be64), high word
pub const IEEE1588_CLK_L_OFFSET: u32 = 0x2004; // ieee1588_clk (be64), low word
pub const IEEE1588_CLK_TYPE_OFFSET: u32 = 0x2008; // ieee1588_clk_type
pub const CLR_INTX_OFFSET: u32 = 0x200c; // clr_intx
pub const ISEG_SIZE: u32 = 0x2010; // sizeof(struct mlx5_init_seg)

// Firmware identity. fw_rev = minor<<16 | major (fw_rev_maj/fw_rev_min);
// cmdif_rev_fw_sub = CMD_IF_REV<<16 | subminor (cmdif_rev/fw_rev_sub).
pub const FW_VER_MAJOR: u32 = 22;
pub const FW_VER_MINOR: u32 = 39;
pub const FW_VER_SUBMINOR: u32 = 1002;
pub const CMD_IF_REV: u32 = 5; // CMD_IF_REV in cmd.c
pub const FW_REV: u32 = FW_VER_MINOR << 16 | FW_VER_MAJOR;
pub const CMDIF_REV_FW_SUB: u32 = CMD_IF_REV << 16 | FW_VER_SUBMINOR;
/// health.fw_ver as print_health_info decodes it: major[31:24] minor[23:16] sub[15:0].
/// Anything but 0xffffffff (sensor_pci_not_working).
pub const HEALTH_FW_VER: u32 = FW_VER_MAJOR << 24 | FW_VER_MINOR << 16 | FW_VER_SUBMINOR;

// cmdq_addr_l_sz fields (mlx5_cmd_enable, mlx5_get/set_nic_state).
pub const CMDQ_ADDR_L_MASK: u32 = 0xffff_f000; // cmd->dma & 0xfffff000
pub const NIC_IFC_SHIFT: u32 = 8; // MLX5_NIC_IFC_OFFSET
pub const NIC_IFC_MASK: u32 = 0x7 << NIC_IFC_SHIFT; // (cmdq_addr_l_sz >> 8) & 7
pub const LOG_CMDQ_SIZE_SHIFT: u32 = 4; // cmd_l >> 4 & 0xf = log_sz
pub const LOG_CMDQ_SIZE: u32 = 5; // 32 slots
pub const LOG_CMDQ_STRIDE: u32 = 6; // 64-byte entries
pub const CMDQ_GEOMETRY: u32 = LOG_CMDQ_SIZE << LOG_CMDQ_SIZE_SHIFT | LOG_CMDQ_STRIDE; // 0x56
pub const NIC_IFC_FULL_DRIVER: u8 = 0; // MLX5_INITIAL_SEG_NIC_INTERFACE_FULL_DRIVER
pub const NIC_IFC_DISABLED: u8 = 1; // MLX5_INITIAL_SEG_NIC_INTERFACE_DISABLED
pub const NIC_IFC_NO_DRAM_NIC: u8 = 2; // MLX5_INITIAL_SEG_NIC_INTERFACE_NO_DRAM_NIC
pub const NIC_IFC_SW_RESET: u8 = 7; // MLX5_INITIAL_SEG_NIC_INTERFACE_SW_RESET

// initializing bits (wait_fw_init, MLX5_FW_RESET_SUPPORTED_OFFSET, MLX5_ECPU_BIT_NUM).
pub const FW_INITIALIZING_BIT: u32 = 1 << 31; // busy while set
pub const FW_RESET_SUPPORTED_BIT: u32 = 1 << 30; // MLX5_FW_RESET_SUPPORTED_OFFSET
pub const ECPU_BIT: u32 = 1 << 23; // MLX5_ECPU_BIT_NUM; kept 0

// Health syndrome word at 0x23c: irisc_index[31:24] synd[23:16] ext_synd[15:0].
pub const HEALTH_SYND_SHIFT: u32 = 16;
pub const HEALTH_SYND_MASK: u32 = 0xff << HEALTH_SYND_SHIFT;
pub const HEALTH_EXT_SYND_MASK: u32 = 0xffff;
// rfr_severity byte, the top byte of the word at 0x238.
pub const HEALTH_RFR_SEVERITY_SHIFT: u32 = 24;
pub const HEALTH_RFR_BIT: u8 = 1 << 7; // MLX5_RFR_BIT_NUM
pub const HEALTH_CRR_BIT: u8 = 1 << 6; // MLX5_CRR_BIT_NUM

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
    pub offset: u32,
    pub name: &'static str,
    pub reset: u32,
    /// Bits a guest write may change.
    pub writable: u32,
    /// Bits a guest clears by writing 1 (none in the iseg today; kept for the table shape).
    pub w1c: u32,
    pub kind: RegKind,
}

const fn reg(
    offset: u32,
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
    //  offset                      name                          reset             writable                         w1c kind
    reg(FW_REV_OFFSET,              "fw_rev",                     FW_REV,           0,                               0, Stored),
    reg(CMDIF_REV_FW_SUB_OFFSET,    "cmdif_rev_fw_sub",           CMDIF_REV_FW_SUB, 0,                               0, Stored),
    reg(CMDQ_ADDR_H_OFFSET,         "cmdq_addr_h",                0,                u32::MAX,                        0, Stored),
    reg(CMDQ_ADDR_L_SZ_OFFSET,      "cmdq_addr_l_sz",             CMDQ_GEOMETRY,    CMDQ_ADDR_L_MASK | NIC_IFC_MASK, 0, CmdqAddrLow),
    reg(CMD_DBELL_OFFSET,           "cmd_dbell",                  0,                u32::MAX,                        0, Doorbell),
    reg(INITIALIZING_OFFSET,        "initializing",               0,                0,                               0, Stored),
    reg(0x200,                      "health.assert_var0",         0,                0,                               0, Stored),
    reg(0x204,                      "health.assert_var1",         0,                0,                               0, Stored),
    reg(0x208,                      "health.assert_var2",         0,                0,                               0, Stored),
    reg(0x20c,                      "health.assert_var3",         0,                0,                               0, Stored),
    reg(0x210,                      "health.assert_var4",         0,                0,                               0, Stored),
    reg(0x214,                      "health.assert_var5",         0,                0,                               0, Stored),
    reg(0x218,                      "health.rsvd0_0",             0,                0,                               0, Stored),
    reg(0x21c,                      "health.rsvd0_1",             0,                0,                               0, Stored),
    reg(0x220,                      "health.assert_exit_ptr",     0,                0,                               0, Stored),
    reg(0x224,                      "health.assert_callra",       0,                0,                               0, Stored),
    reg(0x228,                      "health.rsvd1",               0,                0,                               0, Stored),
    reg(0x22c,                      "health.time",                0,                0,                               0, Stored),
    reg(HEALTH_FW_VER_OFFSET,       "health.fw_ver",              HEALTH_FW_VER,    0,                               0, Stored),
    reg(0x234,                      "health.hw_id",               0,                0,                               0, Stored),
    reg(HEALTH_RFR_SEVERITY_OFFSET, "health.rfr_severity",        0,                0,                               0, Stored),
    reg(HEALTH_SYND_WORD_OFFSET,    "health.irisc_synd_ext_synd", 0,                0,                               0, Stored),
    reg(CMD_EXEC_TO_OFFSET,         "cmd_exec_to",                0,                0,                               0, Stored),
    reg(CMD_Q_INIT_TO_OFFSET,       "cmd_q_init_to",              0,                0,                               0, Stored),
    reg(INTERNAL_TIMER_H_OFFSET,    "internal_timer_h",           0,                0,                               0, TimerHigh),
    reg(INTERNAL_TIMER_L_OFFSET,    "internal_timer_l",           0,                0,                               0, TimerLow),
    reg(HEALTH_COUNTER_OFFSET,      "health_counter",             0,                0,                               0, HealthCounter),
    reg(REAL_TIME_H_OFFSET,         "real_time_h",                0,                0,                               0, Stored),
    reg(REAL_TIME_L_OFFSET,         "real_time_l",                0,                0,                               0, Stored),
    reg(IEEE1588_CLK_H_OFFSET,      "ieee1588_clk_h",             0,                0,                               0, Stored),
    reg(IEEE1588_CLK_L_OFFSET,      "ieee1588_clk_l",             0,                0,                               0, Stored),
    reg(IEEE1588_CLK_TYPE_OFFSET,   "ieee1588_clk_type",          0,                0,                               0, Stored),
    reg(CLR_INTX_OFFSET,            "clr_intx",                   0,                u32::MAX,                        0, WriteIgnored),
];

const NREGS: usize = REGISTERS.len();

fn index_of(offset: u32) -> Option<usize> {
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
    pub fn read(&self, offset: u32, now: Instant) -> u32 {
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
    pub fn write(&mut self, offset: u32, value: u32, bytes: u32, effects: &mut Vec<Bar0Effect>) {
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
                    if (old ^ self.values[i]) & NIC_IFC_MASK != 0 {
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

    fn value_mut(&mut self, offset: u32) -> Option<&mut u32> {
        index_of(offset).map(|i| &mut self.values[i])
    }

    fn value(&self, offset: u32) -> u32 {
        index_of(offset).map_or(0, |i| self.values[i])
    }

    /// Full 64-bit command queue address as last written (low 12 bits zero).
    pub fn cmdq_address(&self) -> u64 {
        u64::from(self.value(CMDQ_ADDR_H_OFFSET)) << 32
            | u64::from(self.value(CMDQ_ADDR_L_SZ_OFFSET) & CMDQ_ADDR_L_MASK)
    }

    pub fn nic_interface(&self) -> u8 {
        ((self.value(CMDQ_ADDR_L_SZ_OFFSET) & NIC_IFC_MASK) >> NIC_IFC_SHIFT) as u8
    }

    /// Device-side change of the nic_interface state (fatal/recovery flows).
    pub fn set_nic_interface(&mut self, state: u8) {
        if let Some(v) = self.value_mut(CMDQ_ADDR_L_SZ_OFFSET) {
            *v = (*v & !NIC_IFC_MASK) | (u32::from(state) << NIC_IFC_SHIFT & NIC_IFC_MASK);
        }
    }

    /// health.synd and health.ext_synd; irisc_index is kept.
    pub fn set_health_syndrome(&mut self, synd: u8, ext_synd: u16) {
        if let Some(v) = self.value_mut(HEALTH_SYND_WORD_OFFSET) {
            *v = (*v & !(HEALTH_SYND_MASK | HEALTH_EXT_SYND_MASK))
                | u32::from(synd) << HEALTH_SYND_SHIFT
                | u32::from(ext_synd);
        }
    }

    /// health.rfr_severity (RFR bit 7, CRR bit 6, severity valid bit 3, severity 2:0).
    pub fn set_rfr_severity(&mut self, rfr_severity: u8) {
        if let Some(v) = self.value_mut(HEALTH_RFR_SEVERITY_OFFSET) {
            *v = (*v & 0x00ff_ffff) | u32::from(rfr_severity) << HEALTH_RFR_SEVERITY_SHIFT;
        }
    }

    /// Restore the whole health buffer to its power-on contents.
    pub fn clear_health(&mut self) {
        for (i, r) in REGISTERS.iter().enumerate() {
            if (HEALTH_OFFSET..HEALTH_OFFSET + HEALTH_SIZE).contains(&r.offset) {
                self.values[i] = r.reset;
            }
        }
    }

    /// Set or clear the `initializing` busy bit (bit 31) for the pre-init handshake.
    pub fn set_initializing(&mut self, busy: bool) {
        if let Some(v) = self.value_mut(INITIALIZING_OFFSET) {
            *v = if busy {
                *v | FW_INITIALIZING_BIT
            } else {
                *v & !FW_INITIALIZING_BIT
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
            s.read(INITIALIZING_OFFSET, now) & (FW_INITIALIZING_BIT | ECPU_BIT),
            0
        );
    }

    #[test]
    fn rfr_severity_and_initializing_hooks() {
        let mut s = Iseg::new();
        let now = Instant::now();
        s.set_rfr_severity(HEALTH_RFR_BIT | 0x8 | 3);
        assert_eq!(s.read(HEALTH_RFR_SEVERITY_OFFSET, now) >> 24, 0x8b);
        s.set_initializing(true);
        assert_eq!(s.read(INITIALIZING_OFFSET, now), FW_INITIALIZING_BIT);
        s.set_initializing(false);
        assert_eq!(s.read(INITIALIZING_OFFSET, now), 0);
        s.set_nic_interface(NIC_IFC_SW_RESET);
        assert_eq!(s.nic_interface(), NIC_IFC_SW_RESET);
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
