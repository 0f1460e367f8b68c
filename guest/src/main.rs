//! The guest kernel's image: Xen's ELF notes and the entry point. Everything else is in the
//! `guest` library, so that its hardware-independent parts build and test on the host too.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod image {
    use core::arch::global_asm;

    // The ELF notes Xen's loader reads (xen/include/public/elfnote.h). Each: namesz, descsz, type,
    // "Xen\0", descriptor padded to 4 bytes. Numeric descriptors are 8 bytes: a 4-byte value would
    // be zero-extended and the higher-half addresses lost.
    global_asm!(
        ".macro xen_note type, kind, value",
        ".balign 4",
        ".long 4, 2f - 1f, \\type",
        ".asciz \"Xen\"",
        "1:",
        ".ifc \\kind, str",
        ".asciz \"\\value\"",
        ".else",
        ".quad \\value",
        ".endif",
        "2:",
        ".balign 4",
        ".endm",
        ".pushsection .note.Xen, \"a\", @note",
        "xen_note 6, str, \"xenpv-lazy-mmu\"", // GUEST_OS
        "xen_note 7, str, \"0.1\"",            // GUEST_VERSION
        "xen_note 5, str, \"xen-3.0\"",        // XEN_VERSION
        "xen_note 8, str, \"generic\"",        // LOADER
        "xen_note 9, str, \"yes\"",            // PAE_MODE
        "xen_note 10, str, \"!writable_page_tables\"", // FEATURES
        "xen_note 3, quad, VIRT_BASE",         // VIRT_BASE
        "xen_note 4, quad, VIRT_BASE",         // PADDR_OFFSET: paddr == vaddr in the ELF
        "xen_note 1, quad, _start",            // ENTRY
        "xen_note 2, quad, hypercall_page",    // HYPERCALL_PAGE
        ".popsection",
    );

    // Entry: Xen passes start_info in rsi, and rsp at the top of a one-page boot stack that lies
    // in the boot mapping. We switch to our own larger stack and keep the boot stack's top to
    // know where the boot mapping's used part ends.
    global_asm!(
        ".pushsection .text.boot, \"ax\", @progbits",
        ".globl _start",
        "_start:",
        "    mov rdi, rsi",
        "    mov rsi, rsp",
        "    lea rsp, [rip + {stack} + {stack_size}]",
        "    xor ebp, ebp",
        "    call {start}",
        "2:  ud2",
        "    jmp 2b",
        ".popsection",
        stack = sym guest::arch::entry::BOOT_STACK,
        stack_size = const guest::arch::entry::BOOT_STACK_SIZE,
        start = sym guest::boot::kernel_start,
    );
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "the guest is a Xen PV kernel: build it with `cargo build --release --target x86_64-unknown-none -p guest` and boot it with scripts/run"
    );
    std::process::exit(2);
}
