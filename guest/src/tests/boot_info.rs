//! What Xen set up: start_info facts consistent with the P2M and M2P, and a filled hypercall
//! page (read through fault probes).

use hypercalls::abi::{self, HYPERVISOR_IRET};
use hypercalls::{PAGE_SIZE, Pfn, calls};

use crate::arch::probe;
use crate::framework::runner::{Context, TestOutcome, failed};
use crate::xen::start_info::VIRT_BASE;
use crate::xen::{self, Role, p2m};

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
    for pfn in (0..info.nr_pages).map(Pfn::new) {
        let mfn = p2m::pfn_to_mfn(pfn);
        let back = mfn.and_then(p2m::mfn_to_pfn);
        ensure_eq!(back, Some(pfn), "M2P[P2M[{pfn}] = {mfn:?}]");
    }
    ensure_eq!(
        p2m::pfn_to_mfn(Pfn::new(info.nr_pages)),
        None,
        "P2M beyond nr_pages"
    );
    // pt_base is the L4 Xen loaded: its frame is a page of the boot mapping.
    let l4_pfn = (info.pt_base - VIRT_BASE) / PAGE_SIZE;
    ensure!(
        l4_pfn < info.first_free_pfn,
        "L4 pfn {l4_pfn:#x} beyond the boot area"
    );
    Ok(())
}

/// The first `n` bytes of the hypercall page's stub for hypercall `nr`.
fn stub(nr: u32, n: usize) -> Result<alloc::vec::Vec<u8>, crate::framework::runner::TestFail> {
    let at = calls::hypercall_page_addr() + u64::from(nr) * 32;
    let mut bytes = alloc::vec::Vec::new();
    for word in 0..n.div_ceil(8) as u64 {
        let w = probe::try_read_u64(at + 8 * word).map_err(|f| failed(format_args!("{f:?}")))?;
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    bytes.truncate(n);
    Ok(bytes)
}

pub fn hypercall_page(_: &Context) -> TestOutcome {
    for nr in [
        abi::HYPERVISOR_MMU_UPDATE,
        abi::HYPERVISOR_MULTICALL,
        abi::HYPERVISOR_SCHED_OP,
    ] {
        let s = stub(nr, 10)?;
        // push %rcx; push %r11; mov $nr, %eax; syscall
        ensure_eq!(&s[..4], &[0x51, 0x41, 0x53, 0xb8], "stub {nr} prologue");
        ensure_eq!(
            u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
            nr,
            "stub {nr} number"
        );
        ensure_eq!(&s[8..10], &[0x0f, 0x05], "stub {nr} syscall");
    }
    ensure_eq!(
        stub(HYPERVISOR_IRET, 5)?,
        [0x51, 0x41, 0x53, 0x50, 0xb8],
        "iret stub pushes rcx, r11, rax"
    );
    let (major, minor) = calls::xen_version();
    ensure!(major >= 4, "Xen version {major}.{minor}");
    Ok(())
}
