//! What the VMM reports about a vCPU when it asks the engine to decide.

/// The vCPU's state at the moment of a fault or of a delivery window, plus what the guest's
/// APF area holds.
///
/// The engine cannot read guest memory: the caller reads the area's two u32 words (little
/// endian, at offsets 0 and 4 of the address last written to `MSR_KVM_ASYNC_PF_EN`) *just
/// before* calling, after performing every [`Action`](crate::Action) already drained. If APF
/// is not enabled on the vCPU, the two words are ignored (pass 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[allow(clippy::struct_excessive_bools)] // independent CPU flags, named as the protocol names them
pub struct VcpuState {
    /// Current privilege level (0..=3).
    pub cpl: u8,
    /// RFLAGS.IF.
    pub interrupts_enabled: bool,
    /// An interrupt shadow (after STI or MOV SS) is in effect.
    pub interrupt_shadow: bool,
    /// An exception or event is pending or being re-injected (including one the VMM itself
    /// is about to inject).
    pub event_pending: bool,
    /// CR0.PG.
    pub paging: bool,
    /// The u32 at area offset 0: v1 "reason" / v2 "flags" (0 = consumed by the guest).
    pub area_reason: u32,
    /// The u32 at area offset 4: v2 page-ready token slot (0 = free).
    pub area_token: u32,
}

impl VcpuState {
    /// A guest task running at CPL 3 with interrupts on, paging on, nothing pending and a
    /// clean area: the state in which every delivery is allowed.
    pub const USER: VcpuState = VcpuState {
        cpl: 3,
        interrupts_enabled: true,
        interrupt_shadow: false,
        event_pending: false,
        paging: true,
        area_reason: 0,
        area_token: 0,
    };

    /// Like [`VcpuState::USER`] but at CPL 0 (the guest kernel, e.g. idle in `sti; hlt`).
    pub const KERNEL: VcpuState = VcpuState {
        cpl: 0,
        ..VcpuState::USER
    };

    /// True when an interrupt (or an injected #PF that must not be nested) may be taken now:
    /// IF = 1 and no interrupt shadow.
    pub const fn interrupts_allowed(&self) -> bool {
        self.interrupts_enabled && !self.interrupt_shadow
    }
}
