//! Constants and structures of Xen's public interface (xen/include/public), x86-64 PV.

use crate::addr::{MachAddr, Mfn, Pte};

pub use xen_sys::{
    __HYPERVISOR_callback_op as HYPERVISOR_CALLBACK_OP,
    __HYPERVISOR_console_io as HYPERVISOR_CONSOLE_IO,
    __HYPERVISOR_event_channel_op as HYPERVISOR_EVENT_CHANNEL_OP,
    __HYPERVISOR_iret as HYPERVISOR_IRET, __HYPERVISOR_memory_op as HYPERVISOR_MEMORY_OP,
    __HYPERVISOR_mmu_update as HYPERVISOR_MMU_UPDATE,
    __HYPERVISOR_mmuext_op as HYPERVISOR_MMUEXT_OP, __HYPERVISOR_multicall as HYPERVISOR_MULTICALL,
    __HYPERVISOR_sched_op as HYPERVISOR_SCHED_OP,
    __HYPERVISOR_set_timer_op as HYPERVISOR_SET_TIMER_OP,
    __HYPERVISOR_set_trap_table as HYPERVISOR_SET_TRAP_TABLE,
    __HYPERVISOR_update_va_mapping as HYPERVISOR_UPDATE_VA_MAPPING,
    __HYPERVISOR_vcpu_op as HYPERVISOR_VCPU_OP, __HYPERVISOR_xen_version as HYPERVISOR_XEN_VERSION,
    CONSOLEIO_write, EVTCHNOP_bind_ipi, EVTCHNOP_bind_virq, EVTCHNOP_close, EVTCHNOP_send,
    EVTCHNOP_unmask, MMU_NORMAL_PT_UPDATE, MMUEXT_INVLPG_LOCAL, MMUEXT_PIN_L1_TABLE,
    MMUEXT_PIN_L2_TABLE, MMUEXT_PIN_L3_TABLE, MMUEXT_PIN_L4_TABLE, MMUEXT_TLB_FLUSH_LOCAL,
    MMUEXT_UNPIN_TABLE, SCHEDOP_block, SCHEDOP_shutdown, SCHEDOP_yield, SHUTDOWN_crash,
    SHUTDOWN_poweroff, SIF_INITDOMAIN, VIRQ_TIMER, mmu_update, mmuext_op, multicall_entry,
    shared_info, start_info, trap_info, vcpu_info, vcpu_time_info,
};

/// One `mmu_update` request: `ptr` is the machine address of the entry (low 2 bits: command),
/// `val` the new entry.
pub type MmuUpdate = xen_sys::mmu_update;
/// One `mmuext_op` request.
pub type MmuextOp = xen_sys::mmuext_op;
/// A domain id.
pub type DomId = u16;

/// `DOMID_SELF`: "the calling domain" (xen.h). Missing from xen-sys.
pub const DOMID_SELF: DomId = 0x7FF0;

/// `update_va_mapping` flags (xen.h). Missing from xen-sys.
pub const UVMF_TLB_FLUSH: u64 = 1;
pub const UVMF_INVLPG: u64 = 2;

/// Count bit Xen sets on a preempted `mmu_update` continuation: a guest must never pass it.
pub const MMU_UPDATE_PREEMPTED: u32 = 1 << 31;

/// `memory_op` sub-command: where the M2P table is and the largest machine frame it covers
/// (memory.h). Missing from xen-sys.
pub const XENMEM_MACHPHYS_MAPPING: u32 = 12;

/// `struct xen_machphys_mapping` (memory.h): the M2P spans `v_start..v_end`; `max_mfn` is the
/// largest machine frame number that can be looked up in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachphysMapping {
    pub v_start: u64,
    pub v_end: u64,
    pub max_mfn: u64,
}

/// `xen_version` sub-commands (version.h).
pub const XENVER_VERSION: u32 = 0;
pub const XENVER_EXTRAVERSION: u32 = 1;
pub const XENVER_CAPABILITIES: u32 = 3;
/// Length of the extraversion / capabilities strings.
pub const XEN_EXTRAVERSION_LEN: usize = 16;
pub const XEN_CAPABILITIES_INFO_LEN: usize = 1024;

/// Start of the read-only machine-to-physical table in every PV guest's address space.
/// (xen-sys has it as an `i64`.)
pub const MACH2PHYS_VIRT_START: u64 = xen_sys::__MACH2PHYS_VIRT_START as u64;
/// End of the hypervisor-reserved hole in the 64-bit address space.
pub const HYPERVISOR_VIRT_START: u64 = xen_sys::__HYPERVISOR_VIRT_START as u64;
pub const HYPERVISOR_VIRT_END: u64 = xen_sys::__HYPERVISOR_VIRT_END as u64;

/// Code selector of a 64-bit PV kernel (ring 3).
pub const FLAT_KERNEL_CS: u16 = 0xe033;

/// Bytes in the PV console ring's `output` array (a power of two: indices wrap with a mask).
pub const XENCONS_OUTPUT_BYTES: usize = 2048;

/// The PV console ring shared with the console backend (io/console.h).
#[repr(C)]
pub struct XenconsInterface {
    pub input: [u8; 1024],
    pub output: [u8; XENCONS_OUTPUT_BYTES],
    pub in_cons: u32,
    pub in_prod: u32,
    pub out_cons: u32,
    pub out_prod: u32,
}

/// `sched_op(SCHEDOP_shutdown)` argument.
#[repr(C)]
pub struct SchedShutdown {
    pub reason: u32,
}

/// `event_channel_op(EVTCHNOP_send)` argument.
#[repr(C)]
pub struct EvtchnSend {
    pub port: u32,
}

/// `callback_op` sub-command and callback types (callback.h). Missing from xen-sys.
pub const CALLBACKOP_REGISTER: u32 = 0;
pub const CALLBACKTYPE_EVENT: u16 = 0;
pub const CALLBACKTYPE_FAILSAFE: u16 = 1;
/// Mask events while the callback runs (the event callback always does).
pub const CALLBACKF_MASK_EVENTS: u16 = 1;

/// `struct callback_register` (callback.h), x86-64: `xen_callback_t` is an address.
#[repr(C)]
pub struct CallbackRegister {
    pub kind: u16,
    pub flags: u16,
    pub pad: u32,
    pub address: u64,
}

/// `vcpu_op` sub-command (vcpu.h): stop the vCPU's periodic timer (arg NULL).
pub const VCPUOP_STOP_PERIODIC_TIMER: u32 = 7;

/// `event_channel_op(EVTCHNOP_bind_virq)` argument; Xen fills in `port`.
#[repr(C)]
pub struct EvtchnBindVirq {
    pub virq: u32,
    pub vcpu: u32,
    pub port: u32,
}

/// `event_channel_op(EVTCHNOP_bind_ipi)` argument; Xen fills in `port`.
#[repr(C)]
pub struct EvtchnBindIpi {
    pub vcpu: u32,
    pub port: u32,
}

/// The argument of `EVTCHNOP_unmask` and `EVTCHNOP_close`: one port.
#[repr(C)]
pub struct EvtchnPort {
    pub port: u32,
}

/// Build an `mmu_update` request writing `val` to the page-table entry at machine address `ptr`.
pub const fn pt_update(ptr: MachAddr, val: Pte) -> MmuUpdate {
    MmuUpdate {
        ptr: ptr.get() | MMU_NORMAL_PT_UPDATE as u64,
        val: val.raw(),
    }
}

/// An all-zero `mmuext_op`, for initialising arrays.
pub const NO_MMUEXT_OP: MmuextOp = MmuextOp {
    cmd: 0,
    arg1: xen_sys::mmuext_op__bindgen_ty_1 { mfn: 0 },
    arg2: xen_sys::mmuext_op__bindgen_ty_2 { src_mfn: 0 },
};

/// Build an `mmuext_op` that takes a frame (pin, unpin).
pub fn mmuext_mfn(cmd: u32, mfn: Mfn) -> MmuextOp {
    MmuextOp {
        cmd,
        arg1: xen_sys::mmuext_op__bindgen_ty_1 { mfn: mfn.get() },
        arg2: xen_sys::mmuext_op__bindgen_ty_2 { src_mfn: 0 },
    }
}

/// Build an `mmuext_op` that takes a linear address (`INVLPG_LOCAL`).
pub fn mmuext_va(cmd: u32, linear_addr: u64) -> MmuextOp {
    MmuextOp {
        cmd,
        arg1: xen_sys::mmuext_op__bindgen_ty_1 { linear_addr },
        arg2: xen_sys::mmuext_op__bindgen_ty_2 { src_mfn: 0 },
    }
}

/// Build an `mmuext_op` without arguments (`TLB_FLUSH_LOCAL`).
pub fn mmuext_plain(cmd: u32) -> MmuextOp {
    mmuext_va(cmd, 0)
}

/// The first argument of an `mmuext_op` (frame or address), whichever the command uses.
pub fn mmuext_arg1(op: &MmuextOp) -> u64 {
    // SAFETY: both union members are u64-sized integers; every bit pattern is valid for either.
    unsafe { op.arg1.mfn }
}

const _: () = {
    assert!(core::mem::size_of::<XenconsInterface>() == 1024 + 2048 + 16);
    assert!(core::mem::size_of::<MmuUpdate>() == 16);
    assert!(core::mem::size_of::<MmuextOp>() == 24);
    assert!(core::mem::size_of::<xen_sys::multicall_entry>() == 64);
    assert!(core::mem::size_of::<xen_sys::trap_info>() == 16);
    assert!(core::mem::size_of::<CallbackRegister>() == 16);
    assert!(core::mem::size_of::<xen_sys::vcpu_info>() == 64);
};
