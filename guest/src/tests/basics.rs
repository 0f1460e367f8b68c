//! The foundation: console, start_info, hypercall page, heap, trap handling.

use alloc::boxed::Box;
use alloc::vec::Vec;

use hypercalls::abi::{self, HYPERVISOR_IRET, MACH2PHYS_VIRT_START};
use hypercalls::calls;

use crate::testing::{Context, TestOutcome};
use crate::traps::{self, Fault};
use crate::xen::{self, Role};
use crate::{ensure, ensure_eq};

pub fn console(_: &Context) -> TestOutcome {
    let role = xen::boot_info().role;
    let expected = if role == Role::InitialDomain {
        "console_io"
    } else {
        "PV console ring"
    };
    ensure_eq!(
        crate::console::describe(),
        expected,
        "console backend for {}",
        role.name()
    );
    // More than the ring holds (2 KiB), in lines, so the ring wraps and must drain.
    let before = crate::console::bytes_accepted();
    let line = "console check: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abc";
    for i in 0..40 {
        println!("{line} {i:02}");
    }
    let accepted = crate::console::bytes_accepted() - before;
    let expected = 40 * (line.len() as u64 + 4);
    ensure_eq!(accepted, expected, "bytes accepted by the console backend");
    // The backend must actually consume them (for the ring: out_cons catches up with out_prod).
    ensure!(
        crate::console::drain(10_000),
        "the console backend did not consume the output"
    );
    Ok(())
}

pub fn start_info(_: &Context) -> TestOutcome {
    let info = xen::boot_info();
    ensure!(
        info.magic.starts_with("xen-3.0-x86_64"),
        "magic {}",
        info.magic
    );
    ensure!(
        info.first_free_pfn < info.nr_pages,
        "no free pages: first free {:#x}",
        info.first_free_pfn
    );
    ensure_eq!(
        info.role == Role::InitialDomain,
        info.flags & abi::SIF_INITDOMAIN != 0,
        "role follows SIF_INITDOMAIN"
    );
    // P2M and M2P must be inverse for every frame we own.
    for pfn in 0..info.nr_pages {
        let mfn = xen::pfn_to_mfn(pfn);
        let back = mfn.and_then(xen::mfn_to_pfn);
        ensure_eq!(back, Some(pfn), "M2P[P2M[{pfn:#x}] = {mfn:#x?}]");
    }
    ensure_eq!(xen::pfn_to_mfn(info.nr_pages), None, "P2M beyond nr_pages");
    // pt_base is the L4 Xen loaded: its frame is a page of the boot mapping.
    let l4_pfn = (info.pt_base - xen::VIRT_BASE) / xen::PAGE_SIZE;
    ensure!(
        l4_pfn < info.first_free_pfn,
        "L4 pfn {l4_pfn:#x} beyond the boot area"
    );
    Ok(())
}

pub fn hypercall_page(_: &Context) -> TestOutcome {
    let page = calls::hypercall_page_addr() as *const u8;
    for nr in [
        abi::HYPERVISOR_MMU_UPDATE,
        abi::HYPERVISOR_MULTICALL,
        abi::HYPERVISOR_SCHED_OP,
    ] {
        // SAFETY: the hypercall page is 4 KiB of our image; nr < 128.
        let stub = unsafe { core::slice::from_raw_parts(page.add(nr as usize * 32), 32) };
        // push %rcx; push %r11; mov $nr, %eax; syscall
        ensure_eq!(&stub[..4], &[0x51, 0x41, 0x53, 0xb8], "stub {nr} prologue");
        ensure_eq!(
            u32::from_le_bytes([stub[4], stub[5], stub[6], stub[7]]),
            nr,
            "stub {nr} number"
        );
        ensure_eq!(&stub[8..10], &[0x0f, 0x05], "stub {nr} syscall");
    }
    // SAFETY: as above.
    let iret = unsafe { core::slice::from_raw_parts(page.add(HYPERVISOR_IRET as usize * 32), 5) };
    ensure_eq!(
        iret,
        &[0x51, 0x41, 0x53, 0x50, 0xb8],
        "iret stub pushes rcx, r11, rax"
    );
    let (major, minor) = calls::xen_version();
    ensure!(major >= 4, "Xen version {major}.{minor}");
    Ok(())
}

pub fn heap(_: &Context) -> TestOutcome {
    let (used_before, _) = crate::heap::usage();
    let boxed = Box::new([0x5au8; 4096]);
    let v: Vec<u64> = (0..10_000u64).map(|i| i * i).collect();
    let (used_during, _) = crate::heap::usage();
    ensure!(
        used_during >= used_before + 4096 + 80_000,
        "usage {used_before} -> {used_during}"
    );
    ensure!(boxed.iter().all(|&b| b == 0x5a), "box contents changed");
    ensure_eq!(
        v.iter().sum::<u64>(),
        (0..10_000u64).map(|i| i * i).sum::<u64>(),
        "vec sum"
    );
    drop(boxed);
    drop(v);
    ensure_eq!(crate::heap::usage().0, used_before, "usage after free");
    Ok(())
}

pub fn page_fault(_: &Context) -> TestOutcome {
    // A read of an unmapped address: #PF, not-present, read, user mode (a PV kernel is ring 3).
    let fault = traps::try_read_u64(0x10).err();
    ensure!(fault.is_some(), "reading address 0x10 did not fault");
    let Fault {
        vector,
        error_code,
        address,
    } = fault.unwrap();
    ensure_eq!(vector, 14, "vector");
    ensure_eq!(address, 0x10, "fault address from vcpu_info.cr2");
    ensure_eq!(
        error_code & 0x3,
        0,
        "error code {error_code:#x}: expected not-present read"
    );
    // A write to the read-only M2P table: #PF, protection violation, write.
    // SAFETY: the M2P is read-only to us; if the write succeeded the test fails anyway.
    let fault = unsafe { traps::try_write_u64(MACH2PHYS_VIRT_START, 0) }.err();
    ensure!(fault.is_some(), "writing the M2P did not fault");
    let f = fault.unwrap();
    ensure_eq!(
        (f.vector, f.address),
        (14, MACH2PHYS_VIRT_START),
        "write fault"
    );
    ensure_eq!(
        f.error_code & 0x3,
        0x3,
        "error code {:#x}: expected protection write",
        f.error_code
    );
    // A readable address reads normally through the same probe.
    let here = xen::boot_info().start_info_va;
    ensure!(
        traps::try_read_u64(here).is_ok(),
        "reading start_info faulted"
    );
    Ok(())
}

/// Deliberate crash: `invlpg` is privileged and a 64-bit PV kernel runs in ring 3, so it raises
/// #GP; the trap handler must report it (vector, error code, rip, registers) and crash the
/// domain, never fault silently. Run by name only.
pub fn bug_privileged_instruction(_: &Context) -> TestOutcome {
    let va = xen::boot_info().start_info_va;
    // SAFETY: in ring 3 `invlpg` cannot flush anything; it raises #GP, which ends the domain.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) va, options(nostack)) };
    Err(crate::testing::failed(
        "invlpg did not fault in a PV kernel",
    ))
}
