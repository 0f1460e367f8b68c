//! The event upcall and context switches: the only code that moves the CPU from one stack to
//! another.
//!
//! Xen delivers an event to a 64-bit PV kernel on its current stack, like an exception without
//! an error code: `[rcx, r11, rip, cs, rflags, rsp, ss]` (the registers themselves hold garbage),
//! with the vCPU's upcall mask set. The stub saves every register as a [`TrapFrame`], lets the
//! layer above handle the pending events ([`ContextHooks::events`]) and then asks it what runs
//! next ([`ContextHooks::schedule`]): the same context or another one that was saved the same
//! way. Either way it returns through `HYPERVISOR_iret` with a flags word of 0, which sets the
//! upcall mask from the frame's IF and re-checks pending events, so nothing is lost.
//!
//! A cooperative switch ([`switch`]) builds the same frame by hand, so every saved context is
//! resumed the same way. A new context ([`Saved::new_task`]) is a frame at the top of a fresh
//! stack whose `rip` is a trampoline that runs a closure and then the exit hook.
//!
//! A [`Saved`] is a context that is not running: the frame its registers are in and the stack
//! they live on. It is created only here and resumed at most once (it is moved into the stub's
//! return value), and it owns its stack (the boot context's stack is static), so a saved frame
//! cannot outlive its memory. The stack of a context that is dropped (a task that exited) is
//! freed only at the next switch, when the CPU is surely on another stack.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::global_asm;
use core::ptr::NonNull;

use hypercalls::abi::{
    CALLBACKF_MASK_EVENTS, CALLBACKTYPE_EVENT, CALLBACKTYPE_FAILSAFE, HYPERVISOR_IRET,
};
use hypercalls::{XenError, calls};

use super::traps::TrapFrame;

/// `vector` of a frame built by the event upcall.
pub const UPCALL_VECTOR: u64 = 0x100;
/// `vector` of a frame built by a cooperative switch.
pub const SWITCH_VECTOR: u64 = 0x101;
/// `vector` of the failsafe callback's report.
pub const FAILSAFE_VECTOR: u64 = 0x102;

/// Kernel code and stack selectors as a 64-bit PV kernel's frames carry them (RPL 0 in the
/// saved CS means "was in the kernel" to `HYPERVISOR_iret`).
const FRAME_CS: u64 = 0xe030;
const FRAME_SS: u64 = 0xe02b;
/// IF set: the context runs with events unmasked.
pub const RFLAGS_IF: u64 = 0x200;
const RFLAGS_RESERVED: u64 = 0x2;

/// Bytes of a task stack.
pub const TASK_STACK_SIZE: usize = 64 * 1024;

global_asm!(
    // Save the 15 general registers above [vector, error code, hardware frame].
    ".macro save_gprs",
    "    push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "    push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14",
    "    push r15",
    ".endm",
    // The event callback. Xen's frame: [rcx, r11, rip, cs, rflags, rsp, ss].
    ".globl hypervisor_callback",
    "hypervisor_callback:",
    "    pop rcx",
    "    pop r11",
    "    push 0",
    "    push {upcall_vector}",
    "    save_gprs",
    "    cld",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    call {upcall}",
    "    jmp context_resume",
    // The failsafe callback: [rcx, r11, ds, es, fs, gs, rip, cs, rflags, rsp, ss]. Fatal.
    ".globl failsafe_callback",
    "failsafe_callback:",
    "    pop rcx",
    "    pop r11",
    "    add rsp, 32",
    "    push 0",
    "    push {failsafe_vector}",
    "    save_gprs",
    "    cld",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    call {failsafe}",
    "    ud2",
    // A cooperative switch, called like a C function: rdi = rflags to resume with, rsi = why.
    // Builds the frame an upcall would have built at the return address.
    ".globl context_switch_stub",
    "context_switch_stub:",
    "    pop rax",
    "    mov rcx, rsp",
    "    push {frame_ss}",
    "    push rcx",
    "    push rdi",
    "    push {frame_cs}",
    "    push rax",
    "    push 0",
    "    push {switch_vector}",
    "    save_gprs",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    call {switch}",
    // rax = the frame to resume: restore it and return through the iret hypercall.
    "context_resume:",
    "    mov rsp, rax",
    "    pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9",
    "    pop r8", "pop rbp", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rbx",
    "    pop rax",
    "    add rsp, 16",
    "    push 0",
    "    jmp hypercall_page + {iret_offset}",
    // A new context starts here with rsp at the top of its stack and r12 = its closure.
    ".globl task_trampoline",
    "task_trampoline:",
    "    xor ebp, ebp",
    "    mov rdi, r12",
    "    call {task_start}",
    "    ud2",
    upcall_vector = const UPCALL_VECTOR,
    failsafe_vector = const FAILSAFE_VECTOR,
    switch_vector = const SWITCH_VECTOR,
    frame_cs = const FRAME_CS,
    frame_ss = const FRAME_SS,
    upcall = sym upcall_entry,
    failsafe = sym failsafe_entry,
    switch = sym switch_entry,
    task_start = sym task_start,
    iret_offset = const HYPERVISOR_IRET as usize * 32,
);

unsafe extern "C" {
    fn hypervisor_callback();
    fn failsafe_callback();
    fn context_switch_stub();
    fn task_trampoline();
}

/// Why the scheduler hook is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// On the way out of an event upcall.
    Upcall,
    /// A cooperative switch ([`switch`]).
    Switch,
}

/// What the upcall and the switches need from the layers above, handed down at [`install`].
pub struct ContextHooks {
    /// Handle the pending events (events are masked).
    pub events: fn(),
    /// Given the context that was running, return the one to run (events are masked).
    pub schedule: fn(Saved, Why) -> Saved,
    /// A new context's closure returned: end it (switch away for good).
    pub exit: fn() -> !,
    /// A frame the failsafe callback reported: fatal.
    pub failsafe: fn(&TrapFrame) -> !,
}

static HOOKS: spin::Once<&'static ContextHooks> = spin::Once::new();

/// Stacks the switch code keeps: the running context's (`None` for the boot stack) and the one
/// of the last dropped context, freed at the next switch.
struct Stacks {
    current: Option<TaskStack>,
    zombie: Option<TaskStack>,
}

/// Only touched with events masked, inside the upcall or a switch: never contended.
static STACKS: spin::Mutex<Stacks> = spin::Mutex::new(Stacks {
    current: None,
    zombie: None,
});

/// A stack of its own for a context: heap memory, 16-byte aligned.
pub struct TaskStack(Vec<u128>);

impl TaskStack {
    fn new() -> TaskStack {
        TaskStack(vec![0u128; TASK_STACK_SIZE / 16])
    }

    fn top(&self) -> u64 {
        self.0.as_ptr() as u64 + (self.0.len() * 16) as u64
    }
}

/// A context that is not running: its saved registers and the stack they are on.
pub struct Saved {
    frame: NonNull<TrapFrame>,
    stack: Option<TaskStack>,
}

// SAFETY: a saved context is only data (a frame no one else touches while it is saved, and the
// stack that holds it); it may be kept anywhere until it is resumed.
unsafe impl Send for Saved {}

impl Saved {
    /// A new context that runs `f` on a fresh stack with events unmasked, then the exit hook.
    pub fn new_task(f: Box<dyn FnOnce() + Send>) -> Saved {
        let stack = TaskStack::new();
        let top = stack.top();
        let at = (top - 128 - core::mem::size_of::<TrapFrame>() as u64) & !15;
        let closure = Box::into_raw(Box::new(f)) as u64;
        let frame = TrapFrame {
            r15: 0,
            r14: 0,
            r13: 0,
            r12: closure,
            r11: 0,
            r10: 0,
            r9: 0,
            r8: 0,
            rbp: 0,
            rdi: 0,
            rsi: 0,
            rdx: 0,
            rcx: 0,
            rbx: 0,
            rax: 0,
            vector: SWITCH_VECTOR,
            error_code: 0,
            rip: task_trampoline as *const () as u64,
            cs: FRAME_CS,
            rflags: RFLAGS_IF | RFLAGS_RESERVED,
            rsp: top,
            ss: FRAME_SS,
        };
        let ptr = at as *mut TrapFrame;
        // SAFETY: `at` lies inside the fresh stack (128 bytes and a frame below its top),
        // aligned for a TrapFrame; nothing else uses the stack yet.
        unsafe { ptr.write(frame) };
        Saved {
            // `at` is inside a live allocation: not null.
            frame: NonNull::new(ptr).expect("stack address"),
            stack: Some(stack),
        }
    }

    /// The saved registers (rip, rsp, the saved IF...).
    pub fn frame(&self) -> &TrapFrame {
        // SAFETY: the frame is a saved context's, which nothing changes while it is saved.
        unsafe { self.frame.as_ref() }
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        // The CPU may still be on this stack (a context that ends itself): free it later.
        if let Some(stack) = self.stack.take() {
            let old = STACKS.lock().zombie.replace(stack);
            drop(old);
        }
    }
}

/// Register the event and failsafe callbacks with Xen and keep the hooks.
pub fn install(hooks: &'static ContextHooks) -> Result<(), XenError> {
    HOOKS.call_once(|| hooks);
    // SAFETY: both are the stubs above, written for Xen's event and failsafe frames.
    unsafe {
        calls::register_callback(
            CALLBACKTYPE_EVENT,
            0,
            hypervisor_callback as *const () as u64,
        )?;
        calls::register_callback(
            CALLBACKTYPE_FAILSAFE,
            CALLBACKF_MASK_EVENTS,
            failsafe_callback as *const () as u64,
        )
    }
}

fn hooks() -> &'static ContextHooks {
    // The callbacks are registered and switches made only after `install`.
    HOOKS.get().expect("context hooks installed")
}

/// Save the running context and resume whatever the scheduler hook returns. `events_on`: the
/// context resumes with events unmasked (the caller masks them before calling, so the switch
/// itself cannot be interrupted).
pub fn switch(events_on: bool) {
    let rflags = RFLAGS_RESERVED | if events_on { RFLAGS_IF } else { 0 };
    // SAFETY: the stub saves every register as a frame on this stack and comes back here
    // through the iret hypercall when this context is resumed, with the callee-saved registers
    // as they were; the C ABI's caller-saved ones are declared clobbered.
    unsafe {
        core::arch::asm!(
            "call {stub}",
            stub = sym context_switch_stub,
            in("rdi") rflags,
            clobber_abi("C"),
        );
    }
}

/// Take the running context's frame and resume the one `schedule` picks.
fn reschedule(frame: *mut TrapFrame, why: Why) -> *mut TrapFrame {
    let current = {
        let mut stacks = STACKS.lock();
        // Not the stack we are on: it belonged to a context dropped at an earlier switch.
        drop(stacks.zombie.take());
        stacks.current.take()
    };
    let saved = Saved {
        // The stubs pass the frame they just pushed: not null.
        frame: NonNull::new(frame).expect("frame"),
        stack: current,
    };
    let mut next = (hooks().schedule)(saved, why);
    let resume = next.frame.as_ptr();
    STACKS.lock().current = next.stack.take();
    // The context is resumed: its frame now belongs to the CPU, not to a `Saved`.
    core::mem::forget(next);
    resume
}

extern "C" fn upcall_entry(frame: *mut TrapFrame) -> *mut TrapFrame {
    (hooks().events)();
    reschedule(frame, Why::Upcall)
}

extern "C" fn switch_entry(frame: *mut TrapFrame) -> *mut TrapFrame {
    reschedule(frame, Why::Switch)
}

extern "C" fn failsafe_entry(frame: *const TrapFrame) -> ! {
    // SAFETY: the stub passes the frame it just pushed on this stack.
    (hooks().failsafe)(unsafe { &*frame })
}

extern "C" fn task_start(f: *mut Box<dyn FnOnce() + Send>) -> ! {
    // SAFETY: `new_task` leaked this box into r12 of a frame that is resumed at most once.
    let f = unsafe { Box::from_raw(f) };
    f();
    (hooks().exit)()
}
