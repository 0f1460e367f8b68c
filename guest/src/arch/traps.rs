//! Exceptions: a trap table for every architectural vector a PV kernel can get. A fault inside a
//! probe ([`super::probe`]) resumes at the probe's fixup; any other trap is fatal and goes to the
//! handler the kernel registered with [`install`] (which reports it and ends the domain).
//!
//! Xen delivers an exception to a 64-bit PV kernel on its current stack with `rcx` and `r11`
//! pushed on top of the hardware frame (`[rcx, r11, (error code), rip, cs, rflags, rsp, ss]`);
//! a handler returns through the `iret` hypercall with `[flags, rip, cs, rflags, rsp, ss]` on the
//! stack and the interrupted `rax`, `r11`, `rcx` still in their registers.

use core::arch::global_asm;
use core::fmt::{self, Write};

use hypercalls::abi::{FLAT_KERNEL_CS, HYPERVISOR_IRET, trap_info};
use hypercalls::calls;

/// Register state at the exception, as the entry stubs push it (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

macro_rules! trap_stubs {
    ($($vec:literal $kind:ident),* $(,)?) => {
        /// Vectors with an entry stub, plus the terminating (0, 0) pair.
        const TRAP_TABLE_LEN: usize = [$($vec),*].len() + 1;

        global_asm!(
            ".macro trap_noerr vec",
            "trap_entry_\\vec:",
            "    pop rcx",
            "    pop r11",
            "    push 0",
            "    push \\vec",
            "    jmp trap_common",
            ".endm",
            ".macro trap_err vec",
            "trap_entry_\\vec:",
            "    pop rcx",
            "    pop r11",
            "    push \\vec",
            "    jmp trap_common",
            ".endm",
            $(concat!("trap_", stringify!($kind), " ", stringify!($vec)),)*
            "trap_common:",
            "    push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
            "    push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14",
            "    push r15",
            "    cld",
            "    mov rdi, rsp",
            "    mov rbx, rsp",
            "    and rsp, -16",
            "    call {dispatch}",
            "    mov rsp, rbx",
            "    pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9",
            "    pop r8", "pop rbp", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rbx",
            "    pop rax",
            "    add rsp, 16",
            "    push 0",
            "    jmp hypercall_page + {iret_offset}",
            ".pushsection .rodata",
            ".balign 8",
            "trap_entry_table:",
            $(concat!(".quad ", stringify!($vec), ", trap_entry_", stringify!($vec)),)*
            ".quad 0, 0",
            ".popsection",
            dispatch = sym trap_dispatch,
            iret_offset = const HYPERVISOR_IRET as usize * 32,
        );
    };
}

// Vectors with an error code: 8 #DF, 10 #TS, 11 #NP, 12 #SS, 13 #GP, 14 #PF, 17 #AC.
trap_stubs!(
    0 noerr, 1 noerr, 3 noerr, 4 noerr, 5 noerr, 6 noerr, 7 noerr, 8 err, 9 noerr, 10 err,
    11 err, 12 err, 13 err, 14 err, 16 noerr, 17 err, 18 noerr, 19 noerr,
);

unsafe extern "C" {
    /// Pairs of (vector, entry address), ending with (0, 0).
    static trap_entry_table: [[u64; 2]; TRAP_TABLE_LEN];
}

const VECTOR_NAMES: [&str; 20] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
];

pub fn vector_name(vector: u64) -> &'static str {
    VECTOR_NAMES
        .get(vector as usize)
        .copied()
        .unwrap_or("unknown vector")
}

/// What a trap needs from the layers above, handed down at [`install`].
pub struct TrapHooks {
    /// The fault address of the last #PF (Xen leaves it in `vcpu_info`).
    pub fault_address: fn() -> u64,
    /// A trap no probe expected: report and end the domain.
    pub fatal: fn(&TrapFrame, u64) -> !,
}

static HOOKS: spin::Once<&'static TrapHooks> = spin::Once::new();
static TRAP_TABLE: spin::Once<[trap_info; TRAP_TABLE_LEN]> = spin::Once::new();

/// Register the trap table with Xen. #BP is allowed from any ring (flags = DPL 3).
pub fn install(hooks: &'static TrapHooks) {
    HOOKS.call_once(|| hooks);
    // SAFETY: `trap_stubs!` emitted the table with exactly TRAP_TABLE_LEN pairs (the last one
    // (0, 0)); it is read-only data.
    let entries = unsafe { &*core::ptr::addr_of!(trap_entry_table) };
    let table = TRAP_TABLE.call_once(|| {
        let mut table = [trap_info {
            vector: 0,
            flags: 0,
            cs: 0,
            address: 0,
        }; TRAP_TABLE_LEN];
        for (slot, &[vector, address]) in table.iter_mut().zip(entries.iter()) {
            *slot = trap_info {
                vector: vector as u8,
                flags: if vector == 3 { 3 } else { 0 },
                cs: if address == 0 { 0 } else { FLAT_KERNEL_CS },
                address,
            };
        }
        table
    });
    // SAFETY: every entry points at a stub emitted by `trap_stubs!`, which takes Xen's
    // exception frame and returns through the iret hypercall.
    unsafe { calls::set_trap_table(table) }.expect("set_trap_table refused the table");
}

extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    let hooks = HOOKS.get();
    let address = match hooks {
        Some(h) if frame.vector == 14 => (h.fault_address)(),
        _ => 0,
    };
    if let Some(resume) = super::probe::fixup(frame.rip, frame.vector, frame.error_code, address) {
        frame.rip = resume;
        frame.rdx = 1;
        return;
    }
    match hooks {
        Some(h) => (h.fatal)(frame, address),
        // Traps are only delivered after `install`, which sets the hooks first.
        None => loop {
            calls::yield_cpu();
        },
    }
}

impl TrapFrame {
    /// The report of a fatal trap: vector, error code, rip, fault address, registers.
    pub fn describe(&self, address: u64, out: &mut dyn Write) -> fmt::Result {
        let f = self;
        writeln!(
            out,
            "\n*** EXCEPTION {} ({}) error code {:#x} at rip {:#018x}",
            f.vector,
            vector_name(f.vector),
            f.error_code,
            f.rip
        )?;
        if f.vector == 14 {
            writeln!(
                out,
                "    fault address {:#018x} ({} {} {})",
                address,
                if f.error_code & 1 != 0 {
                    "protection"
                } else {
                    "not-present"
                },
                if f.error_code & 2 != 0 {
                    "write"
                } else {
                    "read"
                },
                if f.error_code & 16 != 0 { "fetch" } else { "" },
            )?;
        }
        writeln!(
            out,
            "    rax {:016x} rbx {:016x} rcx {:016x} rdx {:016x}\n    rsi {:016x} rdi {:016x} rbp {:016x} rsp {:016x}\n    r8  {:016x} r9  {:016x} r10 {:016x} r11 {:016x}\n    r12 {:016x} r13 {:016x} r14 {:016x} r15 {:016x}\n    cs {:04x} ss {:04x} rflags {:08x} (saved event mask {})",
            f.rax,
            f.rbx,
            f.rcx,
            f.rdx,
            f.rsi,
            f.rdi,
            f.rbp,
            f.rsp,
            f.r8,
            f.r9,
            f.r10,
            f.r11,
            f.r12,
            f.r13,
            f.r14,
            f.r15,
            f.cs & 0xffff,
            f.ss & 0xffff,
            f.rflags,
            // Xen keeps the event mask it saved at delivery in bits 32-39 of the CS slot.
            (f.cs >> 32) & 0xff
        )
    }
}
