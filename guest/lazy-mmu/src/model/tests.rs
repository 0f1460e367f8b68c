//! The model against Xen's rules, hypercall by hypercall.

use hypercalls::abi::{
    MMUEXT_PIN_L2_TABLE, MMUEXT_TLB_FLUSH_LOCAL, UVMF_INVLPG, UVMF_TLB_FLUSH, mmuext_plain,
    pt_update,
};

use super::*;

fn pin(m: &mut Model, level: u8, frame: u64) -> Result<(), XenError> {
    let cmd = MMUEXT_PIN_L1_TABLE + level as u32 - 1;
    m.mmuext_op(&[mmuext_mfn(cmd, mfn(frame))])
        .map_err(|e| e.error)
}

fn unpin(m: &mut Model, frame: u64) -> Result<(), XenError> {
    m.mmuext_op(&[mmuext_mfn(MMUEXT_UNPIN_TABLE, mfn(frame))])
        .map_err(|e| e.error)
}

/// Machine address of entry `index` of frame `table`.
fn at(table: u64, index: u64) -> MachAddr {
    MachAddr::new(table << PAGE_SHIFT | (index * 8)).expect("a model frame")
}

fn write(m: &mut Model, table: u64, index: usize, val: u64) -> Result<(), XenError> {
    m.mmu_update(&[pt_update(at(table, index as u64), Pte::from_raw(val))])
        .map_err(|e| e.error)
}

fn uva(m: &mut Model, va: u64, val: u64, flags: u64) -> Result<(), XenError> {
    m.update_va_mapping(VirtAddr::new(va), Pte::from_raw(val), flags)
}

fn kernel_rw(mfn: u64) -> u64 {
    Space::pte(mfn, Space::DATA_FLAGS)
}

#[test]
fn a_page_table_cannot_be_mapped_writable_but_can_be_read_only() {
    let mut m = Model::new();
    let s = m.build_space(1, 1);
    let table = m.alloc();
    pin(&mut m, 1, table).unwrap();
    assert_eq!(
        write(&mut m, s.l1s[0], 0, kernel_rw(table)),
        Err(XenError::Busy)
    );
    assert_eq!(
        write(&mut m, s.l1s[0], 0, kernel_rw(s.l2)),
        Err(XenError::Busy)
    );
    write(&mut m, s.l1s[0], 0, kernel_rw(table) & !RW).unwrap();
    assert_eq!(m.entry(s.l1s[0], 0), kernel_rw(table) & !RW);
    m.check_refcounts();
}

#[test]
fn a_frame_mapped_writable_cannot_be_pinned_until_unmapped() {
    let mut m = Model::new();
    let s = m.build_space(1, 1);
    write(&mut m, s.l1s[0], 5, kernel_rw(s.data[0])).unwrap();
    write(&mut m, s.l1s[0], 6, kernel_rw(s.data[0])).unwrap();
    let info = m.frame_info(s.data[0]).unwrap();
    assert_eq!((info.ty, info.count), (PageType::Writable, 2));
    assert_eq!(pin(&mut m, 1, s.data[0]), Err(XenError::Inval));
    write(&mut m, s.l1s[0], 5, 0).unwrap();
    assert_eq!(pin(&mut m, 1, s.data[0]), Err(XenError::Inval));
    write(&mut m, s.l1s[0], 6, 0).unwrap();
    pin(&mut m, 1, s.data[0]).unwrap();
    assert!(m.frame_info(s.data[0]).unwrap().is_table(1));
    m.check_refcounts();
}

#[test]
fn pins_do_not_nest_and_unpin_needs_a_pin() {
    let mut m = Model::new();
    let t = m.alloc();
    pin(&mut m, 1, t).unwrap();
    assert_eq!(pin(&mut m, 1, t), Err(XenError::Inval));
    assert_eq!(pin(&mut m, 2, t), Err(XenError::Inval), "a different type");
    unpin(&mut m, t).unwrap();
    assert_eq!(unpin(&mut m, t), Err(XenError::Inval));
    assert_eq!(m.frame_info(t).unwrap().count, 0);
    pin(&mut m, 2, t).unwrap();
    assert_eq!(
        pin(&mut m, 1, 0xdead),
        Err(XenError::Inval),
        "no such frame"
    );
    m.check_refcounts();
}

#[test]
fn upper_entries_must_point_at_the_next_lower_table_type() {
    let mut m = Model::new();
    let s = m.build_space(1, 2);
    // A fresh frame validates as an (empty) L1 table; an L3 or a data frame mapped
    // writable cannot be one.
    let fresh = m.alloc();
    write(&mut m, s.l2, 300, Space::pte(fresh, 0x67)).unwrap();
    assert!(m.frame_info(fresh).unwrap().is_table(1));
    assert_eq!(
        write(&mut m, s.l2, 301, Space::pte(s.l3, 0x67)),
        Err(XenError::Inval)
    );
    write(&mut m, s.l1s[0], 0, kernel_rw(s.data[0])).unwrap();
    assert_eq!(
        write(&mut m, s.l2, 302, Space::pte(s.data[0], 0x67)),
        Err(XenError::Inval)
    );
    assert_eq!(
        write(&mut m, s.l2, 303, Space::pte(0xdead, 0x67)),
        Err(XenError::Inval)
    );
    assert_eq!(
        write(&mut m, s.l3, 7, Space::pte(s.l1s[0], 0x67)),
        Err(XenError::Inval)
    );
    assert_eq!(
        write(&mut m, s.l2, 304, Space::pte(fresh, 0x67 | PSE)),
        Err(XenError::Inval)
    );
    // Replacing the entry releases the table: now it may be mapped writable.
    write(&mut m, s.l2, 300, 0).unwrap();
    assert_eq!(m.frame_info(fresh).unwrap().count, 0);
    write(&mut m, s.l1s[0], 1, kernel_rw(fresh)).unwrap();
    m.check_refcounts();
}

#[test]
fn validation_checks_every_entry_and_keeps_nothing_on_failure() {
    let mut m = Model::new();
    let s = m.build_space(1, 2);
    let pinned = m.alloc();
    pin(&mut m, 1, pinned).unwrap();
    // An unused frame holding a writable mapping of a data page and one of a page table.
    let l1 = m.alloc();
    m.poke(l1, 0, kernel_rw(s.data[1]));
    m.poke(l1, 1, kernel_rw(pinned));
    assert_eq!(
        write(&mut m, s.l2, 400, Space::pte(l1, 0x67)),
        Err(XenError::Busy)
    );
    assert_eq!(m.frame_info(l1).unwrap().count, 0);
    assert_eq!(
        m.frame_info(s.data[1]).unwrap().count,
        0,
        "reference undone"
    );
    m.check_refcounts();
    // An L2 holding that L1 fails to pin for the same reason, two levels down.
    let l2 = m.alloc();
    m.poke(l2, 0, Space::pte(l1, 0x67));
    assert_eq!(pin(&mut m, 2, l2), Err(XenError::Busy));
    m.poke(l1, 1, kernel_rw(pinned) & !RW);
    pin(&mut m, 2, l2).unwrap();
    assert!(m.frame_info(l1).unwrap().is_table(1));
    assert_eq!(m.frame_info(s.data[1]).unwrap().count, 1);
    // Unpinning releases the whole tree again.
    unpin(&mut m, l2).unwrap();
    assert_eq!(m.frame_info(l1).unwrap().count, 0);
    assert_eq!(m.frame_info(s.data[1]).unwrap().count, 0);
    m.check_refcounts();
}

#[test]
fn a_table_cannot_validate_through_itself() {
    let mut m = Model::new();
    let t = m.alloc();
    m.poke(t, 0, kernel_rw(t));
    assert_eq!(pin(&mut m, 1, t), Err(XenError::Busy));
    assert_eq!(m.frame_info(t).unwrap().ty, PageType::None);
    m.poke(t, 0, kernel_rw(t) & !RW);
    pin(&mut m, 1, t).unwrap();
}

#[test]
fn l1_entries_for_frames_the_guest_does_not_own_are_refused() {
    let mut m = Model::new();
    let s = m.build_space(1, 1);
    assert_eq!(
        write(&mut m, s.l1s[0], 0, kernel_rw(0xdead)),
        Err(XenError::Perm)
    );
    // A non-present entry may hold anything.
    write(&mut m, s.l1s[0], 0, 0xdead << 12).unwrap();
    // The entry itself must be in a frame of the guest.
    let r = m.mmu_update(&[pt_update(at(0xdead, 0), Pte::NONE)]);
    assert_eq!(
        r,
        Err(PartialFailure {
            done: 0,
            error: XenError::Inval
        })
    );
    let r = m.mmu_update(&[MmuUpdate {
        ptr: s.l1s[0] << 12 | 1,
        val: 0,
    }]);
    assert_eq!(
        r.unwrap_err().error,
        XenError::NoSys,
        "MMU_MACHPHYS_UPDATE is not modelled"
    );
}

#[test]
fn updates_of_data_frames_are_plain_writes() {
    // do_mmu_update writes a page that is not a page table in use as plain data.
    let mut m = Model::new();
    let s = m.build_space(1, 1);
    write(&mut m, s.data[0], 3, kernel_rw(s.l4)).unwrap();
    assert_eq!(m.entry(s.data[0], 3), kernel_rw(s.l4));
    m.check_refcounts();
}

#[test]
fn xen_owns_l4_slots_256_to_271() {
    let mut m = Model::new();
    let s = m.build_space(1, 1);
    let l3 = m.alloc();
    assert_eq!(
        write(&mut m, s.l4, 256, Space::pte(l3, 0x67)),
        Err(XenError::Inval)
    );
    assert_eq!(write(&mut m, s.l4, 271, 0), Err(XenError::Inval));
    write(&mut m, s.l4, 272, Space::pte(l3, 0x67)).unwrap();
    assert_eq!(m.entry(s.l4, 272), Space::pte(l3, 0x67 | USER | ACCESSED));
}

#[test]
fn stored_entries_are_adjusted_for_a_ring_3_kernel() {
    let mut m = Model::new();
    let s = m.build_space(1, 1);
    let kernel = Space::pte(s.data[0], PRESENT | RW | ACCESSED | DIRTY);
    write(&mut m, s.l1s[0], 0, kernel).unwrap();
    assert_eq!(m.entry(s.l1s[0], 0), kernel | USER | GUEST_KERNEL);
    let user = Space::pte(s.data[0], PRESENT | USER);
    write(&mut m, s.l1s[0], 1, user).unwrap();
    assert_eq!(m.entry(s.l1s[0], 1), user | GLOBAL);
    assert_eq!(
        Model::adjust(1, 0x1234 << 12),
        0x1234 << 12,
        "not present: as written"
    );
    assert_eq!(Model::adjust(2, PRESENT), PRESENT | USER);
}

#[test]
fn flag_only_changes_take_the_fast_path() {
    let mut m = Model::new();
    let s = m.build_space(1, 1);
    write(&mut m, s.l1s[0], 0, kernel_rw(s.data[0])).unwrap();
    write(&mut m, s.l1s[0], 0, kernel_rw(s.data[0]) | NX).unwrap();
    write(&mut m, s.l1s[0], 0, kernel_rw(s.data[0]) & !DIRTY).unwrap();
    assert_eq!(m.frame_info(s.data[0]).unwrap().count, 1);
    // Dropping RW is not a fast-path change: the writable reference goes.
    write(&mut m, s.l1s[0], 0, kernel_rw(s.data[0]) & !RW).unwrap();
    assert_eq!(m.frame_info(s.data[0]).unwrap().count, 0);
    m.check_refcounts();
}

#[test]
fn update_va_mapping_walks_from_the_root() {
    let mut m = Model::new();
    let s = m.build_space(2, 2);
    let va = Space::BASE_VA + 513 * 4096;
    uva(&mut m, va, kernel_rw(s.data[1]), UVMF_INVLPG).unwrap();
    assert_eq!(m.entry(s.l1s[1], 1), kernel_rw(s.data[1]));
    assert_eq!(m.invlpgs, [va]);
    uva(&mut m, va, 0, UVMF_TLB_FLUSH).unwrap();
    assert_eq!(m.tlb_flushes, 1);
    let table = m.alloc();
    pin(&mut m, 1, table).unwrap();
    assert_eq!(uva(&mut m, va, kernel_rw(table), 0), Err(XenError::Busy));
    // No L1 table maps these.
    let unmapped = Space::BASE_VA + 512 * 512 * 4096;
    assert_eq!(uva(&mut m, unmapped, 0, 0), Err(XenError::Inval));
    assert_eq!(
        uva(&mut m, HYPERVISOR_VIRT_START, 0, 0),
        Err(XenError::Inval)
    );
    assert_eq!(m.counts.update_va_mapping, 5);
    // A `VirtAddr` is always canonical; the raw hypercall still refuses what is not.
    assert_eq!(
        m.uva(1 << 47, 0, 0).0,
        Err(XenError::Inval),
        "not canonical"
    );
}

#[test]
fn a_multicall_runs_every_entry_and_reports_each() {
    let mut m = Model::new();
    let s = m.build_space(1, 2);
    let table = m.alloc();
    pin(&mut m, 1, table).unwrap();
    m.reset_stats();
    let p = |i: u64| pt_update(at(s.l1s[0], i), Pte::from_raw(kernel_rw(s.data[0])));
    let reqs = [
        p(0),
        pt_update(at(s.l1s[0], 1), Pte::from_raw(kernel_rw(table))),
        p(2),
        p(3),
    ];
    let ops = [
        mmuext_plain(MMUEXT_TLB_FLUSH_LOCAL),
        mmuext_mfn(MMUEXT_PIN_L2_TABLE, mfn(table)),
    ];
    let entries = [
        Entry::Updates { first: 0, count: 3 },
        Entry::TableOps { first: 0, count: 1 },
        Entry::Updates { first: 3, count: 1 },
        Entry::TableOps { first: 1, count: 1 },
    ];
    let batch = Batch {
        entries: &entries,
        reqs: &reqs,
        ops: &ops,
    };
    let mut out = [EntryOutcome::default(); 4];
    m.multicall(batch, &mut out).unwrap();
    assert_eq!(
        out.map(|o| (o.result, o.done)),
        [(-16, 1), (0, 1), (0, 1), (-22, 0)]
    );
    assert_eq!(m.entry(s.l1s[0], 0), kernel_rw(s.data[0]));
    assert_eq!(
        m.entry(s.l1s[0], 2),
        0,
        "not run: Xen stopped at the refused request"
    );
    assert_eq!(m.entry(s.l1s[0], 3), kernel_rw(s.data[0]));
    assert_eq!(m.tlb_flushes, 1);
    assert_eq!((m.counts.multicall, m.counts.multicall_entries), (1, 4));
    assert_eq!(m.counts.hypercalls(), 1);
    m.multicall_limit = 3;
    assert_eq!(
        m.multicall(batch, &mut out),
        Err(MulticallFailure {
            ran: 0,
            error: XenError::Inval
        })
    );
    assert_eq!(m.counts.rejected_multicalls, 1);
    assert_eq!(m.log.len(), 2);
    assert!(matches!(&m.log[1], Call::Multicall { calls, result: -22 } if calls.is_empty()));
    m.check_refcounts();
}

#[test]
fn the_root_holds_a_reference() {
    let mut m = Model::new();
    let s = m.build_space(1, 1);
    unpin(&mut m, s.l4).unwrap();
    let info = m.frame_info(s.l4).unwrap();
    assert_eq!((info.ty, info.count, info.pinned), (PageType::L4, 1, false));
    assert!(
        m.frame_info(s.l1s[0]).unwrap().is_table(1),
        "still reachable from the root"
    );
    let other = m.alloc();
    m.set_root(other).unwrap();
    assert_eq!(m.frame_info(s.l4).unwrap().count, 0);
    assert_eq!(
        m.frame_info(s.l1s[0]).unwrap().count,
        0,
        "the whole tree released"
    );
    m.check_refcounts();
}

#[test]
fn a_multicall_stopped_part_way_runs_only_the_first_entries() {
    let mut m = Model::new();
    let s = m.build_space(1, 2);
    let reqs = [
        pt_update(at(s.l1s[0], 0), Pte::from_raw(kernel_rw(s.data[0]))),
        pt_update(at(s.l1s[0], 1), Pte::from_raw(kernel_rw(s.data[1]))),
    ];
    let ops = [mmuext_plain(MMUEXT_TLB_FLUSH_LOCAL)];
    let entries = [
        Entry::Updates { first: 0, count: 1 },
        Entry::TableOps { first: 0, count: 1 },
        Entry::Updates { first: 1, count: 1 },
    ];
    let batch = Batch {
        entries: &entries,
        reqs: &reqs,
        ops: &ops,
    };
    m.multicall_fault_after = Some(2);
    let mut out = [EntryOutcome::default(); 3];
    assert_eq!(
        m.multicall(batch, &mut out),
        Err(MulticallFailure {
            ran: 2,
            error: XenError::Fault
        })
    );
    assert_eq!(out.map(|o| (o.result, o.done)), [(0, 1), (0, 1), (0, 0)]);
    assert_eq!(m.entry(s.l1s[0], 0), kernel_rw(s.data[0]));
    assert_eq!(m.entry(s.l1s[0], 1), 0, "the third entry did not run");
    assert_eq!(m.tlb_flushes, 1);
    assert_eq!(m.counts.multicall_entries, 2);
    assert!(matches!(&m.log[0], Call::Multicall { calls, result: -14 } if calls.len() == 2));
    m.check_refcounts();
}
