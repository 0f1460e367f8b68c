//! Typed hypercall wrappers: slices and structs in, `Result` with a named [`XenError`] out.
//!
//! Each wrapper only marshals arguments; what to call when is the kernel's business.

use x86_64::VirtAddr;

use crate::abi::*;
use crate::addr::Pte;
use crate::error::{PartialFailure, XenError};
use crate::multicall::MulticallEntry;
use crate::raw::hypercall;
pub use crate::raw::{hypercall_page_addr, issued};

fn checked_count(len: usize) -> Result<u32, XenError> {
    // Xen reads bit 31 of the count as its own "preempted" marker.
    if len as u64 >= MMU_UPDATE_PREEMPTED as u64 {
        Err(XenError::Inval)
    } else {
        Ok(len as u32)
    }
}

/// `console_io(CONSOLEIO_write)`: write bytes to Xen's console (the initial domain only, on a
/// release build of Xen).
pub fn console_write(bytes: &[u8]) -> Result<(), XenError> {
    // SAFETY: Xen reads `len` bytes from a live slice.
    let ret = unsafe {
        hypercall(
            HYPERVISOR_CONSOLE_IO,
            CONSOLEIO_write as u64,
            bytes.len() as u64,
            bytes.as_ptr() as u64,
            0,
            0,
        )
    };
    XenError::check(ret).map(drop)
}

/// `sched_op(SCHEDOP_shutdown, reason)`. Returns only if Xen refused.
pub fn shutdown(reason: u32) -> XenError {
    let arg = SchedShutdown { reason };
    // SAFETY: Xen reads the struct, which outlives the call.
    let ret = unsafe {
        hypercall(
            HYPERVISOR_SCHED_OP,
            SCHEDOP_shutdown as u64,
            &arg as *const _ as u64,
            0,
            0,
            0,
        )
    };
    XenError::from_errno(ret)
}

/// `sched_op(SCHEDOP_yield)`.
pub fn yield_cpu() {
    // SAFETY: no pointer arguments.
    unsafe { hypercall(HYPERVISOR_SCHED_OP, SCHEDOP_yield as u64, 0, 0, 0, 0) };
}

/// `xen_version(XENVER_version)`: (major, minor).
pub fn xen_version() -> (u32, u32) {
    // SAFETY: this sub-command takes no buffer.
    let v = unsafe { hypercall(HYPERVISOR_XEN_VERSION, XENVER_VERSION as u64, 0, 0, 0, 0) };
    ((v as u64 >> 16) as u32, (v as u64 & 0xffff) as u32)
}

/// `xen_version(cmd, buf)` for the string sub-commands; `buf` must be as large as Xen's type.
pub fn xen_version_string(cmd: u32, buf: &mut [u8]) -> Result<(), XenError> {
    let needed = match cmd {
        XENVER_EXTRAVERSION => XEN_EXTRAVERSION_LEN,
        XENVER_CAPABILITIES => XEN_CAPABILITIES_INFO_LEN,
        _ => return Err(XenError::Inval),
    };
    if buf.len() < needed {
        return Err(XenError::Range);
    }
    // SAFETY: `buf` holds at least as many bytes as Xen writes for `cmd`.
    let ret = unsafe {
        hypercall(
            HYPERVISOR_XEN_VERSION,
            cmd as u64,
            buf.as_mut_ptr() as u64,
            0,
            0,
            0,
        )
    };
    XenError::check(ret).map(drop)
}

/// The request arrays `mmu_update` and `mmuext_op` take: same calling convention
/// (`reqs, count, &done, domid`), same partial-failure rule.
pub trait BatchRequest: private::Sealed {
    /// The hypercall that takes an array of these.
    const HYPERCALL: u32;
}

impl BatchRequest for MmuUpdate {
    const HYPERCALL: u32 = HYPERVISOR_MMU_UPDATE;
}

impl BatchRequest for MmuextOp {
    const HYPERCALL: u32 = HYPERVISOR_MMUEXT_OP;
}

mod private {
    pub trait Sealed {}
    impl Sealed for super::MmuUpdate {}
    impl Sealed for super::MmuextOp {}
}

/// `mmu_update(reqs, count, &done, domid)` or `mmuext_op(ops, count, &done, domid)`: Xen
/// processes the requests in order and stops at the first that fails.
///
/// # Safety
/// The requests change live page tables (or switch base pointers): they must not unmap or
/// remap memory that Rust code still references (the stack, the image, borrowed buffers), and
/// must leave the address space the kernel runs in intact.
pub unsafe fn batch<T: BatchRequest>(reqs: &[T], domid: DomId) -> Result<(), PartialFailure> {
    let count = checked_count(reqs.len()).map_err(|error| PartialFailure { done: 0, error })?;
    let mut done: u32 = 0;
    // SAFETY: Xen reads `count` requests from a live slice and writes `done`; the caller vouches
    // for what the requests change.
    let ret = unsafe {
        hypercall(
            T::HYPERCALL,
            reqs.as_ptr() as u64,
            count as u64,
            &mut done as *mut u32 as u64,
            domid as u64,
            0,
        )
    };
    match XenError::check(ret) {
        Ok(_) => Ok(()),
        Err(error) => Err(PartialFailure { done, error }),
    }
}

/// `update_va_mapping(va, val, flags)`: write the L1 entry that maps `va` in the current tables.
///
/// # Safety
/// Changing the mapping of `va` must not pull memory out from under live Rust references (e.g.
/// remapping the stack or a borrowed buffer).
pub unsafe fn update_va_mapping(va: VirtAddr, val: Pte, flags: u64) -> Result<(), XenError> {
    // SAFETY: the caller vouches that the mapping change is sound; no pointer is passed.
    let ret = unsafe {
        hypercall(
            HYPERVISOR_UPDATE_VA_MAPPING,
            va.as_u64(),
            val.raw(),
            flags,
            0,
            0,
        )
    };
    XenError::check(ret).map(drop)
}

/// `multicall(entries, count)`. `Ok` means Xen ran every entry: each entry's own `result` says how
/// it went. `Err` means the list itself was rejected.
///
/// # Safety
/// Every pointer in every entry's arguments must be valid for that hypercall until this returns.
pub unsafe fn multicall(entries: &mut [MulticallEntry]) -> Result<(), XenError> {
    // SAFETY: the caller vouches for the pointers inside the entries; Xen writes `result` fields
    // of the live slice.
    let ret = unsafe {
        hypercall(
            HYPERVISOR_MULTICALL,
            entries.as_mut_ptr() as u64,
            entries.len() as u64,
            0,
            0,
            0,
        )
    };
    XenError::check(ret).map(drop)
}

/// `memory_op(XENMEM_machphys_mapping)`: where Xen maps the M2P table and its last frame.
pub fn machphys_mapping() -> Result<MachphysMapping, XenError> {
    let mut out = MachphysMapping::default();
    // SAFETY: Xen writes one `xen_machphys_mapping` into the struct, which outlives the call.
    let ret = unsafe {
        hypercall(
            HYPERVISOR_MEMORY_OP,
            XENMEM_MACHPHYS_MAPPING as u64,
            &mut out as *mut _ as u64,
            0,
            0,
            0,
        )
    };
    XenError::check(ret).map(|_| out)
}

/// `event_channel_op(EVTCHNOP_send, port)`.
pub fn evtchn_send(port: u32) -> Result<(), XenError> {
    let arg = EvtchnSend { port };
    // SAFETY: Xen reads the struct, which outlives the call.
    let ret = unsafe {
        hypercall(
            HYPERVISOR_EVENT_CHANNEL_OP,
            EVTCHNOP_send as u64,
            &arg as *const _ as u64,
            0,
            0,
            0,
        )
    };
    XenError::check(ret).map(drop)
}

/// `set_trap_table(table)`: the table must end with an all-zero entry.
///
/// # Safety
/// Every non-zero entry's address must be an entry stub that handles Xen's exception frame.
pub unsafe fn set_trap_table(table: &'static [trap_info]) -> Result<(), XenError> {
    match table.last() {
        Some(t) if t.address == 0 && t.vector == 0 => {}
        _ => return Err(XenError::Inval),
    }
    // SAFETY: Xen reads the zero-terminated table, which is 'static; the caller vouches for the
    // handler addresses.
    let ret = unsafe { hypercall(HYPERVISOR_SET_TRAP_TABLE, table.as_ptr() as u64, 0, 0, 0, 0) };
    XenError::check(ret).map(drop)
}

fn evtchn_op<T>(cmd: u32, arg: &mut T) -> Result<(), XenError> {
    // SAFETY: every caller passes the argument struct of `cmd`, which outlives the call; Xen
    // reads it and may write its output fields.
    let ret = unsafe {
        hypercall(
            HYPERVISOR_EVENT_CHANNEL_OP,
            cmd as u64,
            arg as *mut T as u64,
            0,
            0,
            0,
        )
    };
    XenError::check(ret).map(drop)
}

/// `EVTCHNOP_bind_virq`: a port for `virq` on `vcpu`.
pub fn evtchn_bind_virq(virq: u32, vcpu: u32) -> Result<u32, XenError> {
    let mut arg = EvtchnBindVirq {
        virq,
        vcpu,
        port: 0,
    };
    evtchn_op(EVTCHNOP_bind_virq, &mut arg).map(|()| arg.port)
}

/// `EVTCHNOP_bind_ipi`: a port that `evtchn_send` raises on `vcpu`.
pub fn evtchn_bind_ipi(vcpu: u32) -> Result<u32, XenError> {
    let mut arg = EvtchnBindIpi { vcpu, port: 0 };
    evtchn_op(EVTCHNOP_bind_ipi, &mut arg).map(|()| arg.port)
}

/// `EVTCHNOP_unmask`: clear the port's mask bit and deliver it if pending (a plain store to
/// the mask bit would not).
pub fn evtchn_unmask(port: u32) -> Result<(), XenError> {
    evtchn_op(EVTCHNOP_unmask, &mut EvtchnPort { port })
}

/// `EVTCHNOP_close`.
pub fn evtchn_close(port: u32) -> Result<(), XenError> {
    evtchn_op(EVTCHNOP_close, &mut EvtchnPort { port })
}

/// `callback_op(CALLBACKOP_register)`: where Xen delivers events (`CALLBACKTYPE_EVENT`) or
/// reports a segment it could not load (`CALLBACKTYPE_FAILSAFE`).
///
/// # Safety
/// `address` must be an entry stub that handles Xen's callback frame for `kind`.
pub unsafe fn register_callback(kind: u16, flags: u16, address: u64) -> Result<(), XenError> {
    let arg = CallbackRegister {
        kind,
        flags,
        pad: 0,
        address,
    };
    // SAFETY: Xen reads the struct, which outlives the call; the caller vouches for the entry.
    let ret = unsafe {
        hypercall(
            HYPERVISOR_CALLBACK_OP,
            CALLBACKOP_REGISTER as u64,
            &arg as *const _ as u64,
            0,
            0,
            0,
        )
    };
    XenError::check(ret).map(drop)
}

/// `set_timer_op(deadline)`: one VIRQ_TIMER at system time `deadline_ns` (0 cancels). A past
/// deadline fires at once.
pub fn set_timer_op(deadline_ns: u64) -> Result<(), XenError> {
    // SAFETY: no pointer arguments.
    let ret = unsafe { hypercall(HYPERVISOR_SET_TIMER_OP, deadline_ns, 0, 0, 0, 0) };
    XenError::check(ret).map(drop)
}

/// `vcpu_op(VCPUOP_stop_periodic_timer, vcpu)`: stop the 100 Hz tick a PV vCPU starts with.
pub fn stop_periodic_timer(vcpu: u32) -> Result<(), XenError> {
    // SAFETY: this sub-command takes no argument struct.
    let ret = unsafe {
        hypercall(
            HYPERVISOR_VCPU_OP,
            VCPUOP_STOP_PERIODIC_TIMER as u64,
            vcpu as u64,
            0,
            0,
            0,
        )
    };
    XenError::check(ret).map(drop)
}

/// `sched_op(SCHEDOP_block)`: sleep until an event is pending (Xen unmasks events).
pub fn block() {
    // SAFETY: no pointer arguments.
    unsafe { hypercall(HYPERVISOR_SCHED_OP, SCHEDOP_block as u64, 0, 0, 0, 0) };
}
