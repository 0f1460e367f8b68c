//! Set-up and inspection helpers shared by the integration tests.
#![allow(dead_code)]

use hypercalls::abi::pt_update;
use hypercalls::{MachAddr, Pte, XenError};
use lazy_mmu::model::{ACCESSED, Call, Model, PRESENT, RW, Space, USER, mfn};
use lazy_mmu::program::Layout;
use lazy_mmu::{
    DEFAULT_ENTRIES, DEFAULT_REQUESTS, Hypervisor, LazyMmu, MmuError, Refusal, Refusals, Request,
};

pub type Lazy<const E: usize = DEFAULT_ENTRIES, const R: usize = DEFAULT_REQUESTS> =
    LazyMmu<Model, E, R>;

/// A model with `tables` empty L1 tables and `data` data frames, and a lazy-MMU state over it.
pub fn setup<const E: usize, const R: usize>(tables: usize, data: usize) -> (Lazy<E, R>, Space) {
    let mut model = Model::new();
    let space = model.build_space(tables, data);
    (LazyMmu::new(model), space)
}

/// Two L1 tables, 32 data frames, the default queue.
/// [`std_setup`] plus a value Xen refuses in every slot: a writable mapping of a pinned L1
/// table (`get_page_from_l1e`: -EBUSY).
pub fn refusing_setup() -> (Lazy, Space, Pte) {
    let (mut l, s) = std_setup();
    let table = pinned_l1(&mut l);
    (l, s, writable(table))
}

pub fn std_setup() -> (Lazy, Space) {
    setup(2, 32)
}

/// Map data frame `frame` at `slot`.
pub fn set<const E: usize, const R: usize>(
    l: &mut Lazy<E, R>,
    s: &Space,
    slot: usize,
    frame: usize,
) -> Result<(), MmuError> {
    l.set_pte(s.pte_ptr(slot), s.pte_value(frame), s.va(slot))
}

/// Write `val` at `slot`.
pub fn put<const E: usize, const R: usize>(
    l: &mut Lazy<E, R>,
    s: &Space,
    slot: usize,
    val: Pte,
) -> Result<(), MmuError> {
    l.set_pte(s.pte_ptr(slot), val, s.va(slot))
}

/// The request `put(slot, val)` makes.
pub fn set_pte_request(s: &Space, slot: usize, val: Pte) -> Request {
    Request::SetPte {
        ptr: s.pte_ptr(slot),
        val,
        va: s.va(slot),
    }
}

/// The live entry of `slot`, straight from the model.
pub fn live<const E: usize, const R: usize>(l: &Lazy<E, R>, s: &Space, slot: usize) -> Pte {
    l.hypervisor().read_pte(s.pte_ptr(slot)).expect("a slot")
}

/// Hypercalls logged so far (a multicall counts once).
pub fn calls<const E: usize, const R: usize>(l: &Lazy<E, R>) -> usize {
    l.hypervisor().log.len()
}

pub fn last_call<const E: usize, const R: usize>(l: &Lazy<E, R>) -> &Call {
    l.hypervisor().log.last().expect("a hypercall")
}

/// The log with multicalls replaced by the calls they ran.
pub fn flat_log<const E: usize, const R: usize>(l: &Lazy<E, R>) -> Vec<Call> {
    l.hypervisor()
        .log
        .iter()
        .flat_map(|c| match c {
            Call::Multicall { calls, .. } => calls.clone(),
            c => vec![c.clone()],
        })
        .collect()
}

/// A plain `mmu_update` of `reqs` requests that succeeded.
pub fn mmu_call(reqs: usize) -> impl Fn(&Call) -> bool {
    move |c| matches!(c, Call::MmuUpdate { reqs: r, result: 0, .. } if r.len() == reqs)
}

/// A fresh frame pinned as an L1 table (outside the lazy layer, as set-up).
pub fn pinned_l1<const E: usize, const R: usize>(l: &mut Lazy<E, R>) -> u64 {
    let hv = l.hypervisor_mut();
    let t = hv.alloc();
    hv.mmuext_op(&[lazy_mmu::TableOp::Pin(lazy_mmu::TableLevel::L1, mfn(t)).to_mmuext()])
        .expect("set-up pin");
    hv.reset_stats();
    t
}

/// A fresh untyped frame (not logged).
pub fn fresh_frame<const E: usize, const R: usize>(l: &mut Lazy<E, R>) -> u64 {
    l.hypervisor_mut().alloc()
}

/// A kernel mapping of frame `frame`, writable, as Xen stores it.
pub fn writable(frame: u64) -> Pte {
    Pte::from_raw(Space::pte(frame, Space::DATA_FLAGS))
}

/// An upper-level entry pointing at table `frame`.
pub fn table_entry(frame: u64) -> Pte {
    Pte::from_raw(Space::pte(frame, PRESENT | RW | USER | ACCESSED))
}

/// Machine address of entry `index` of frame `frame`.
pub fn entry_of(frame: u64, index: u64) -> MachAddr {
    mfn(frame).entry(index).expect("an entry index")
}

/// The refusals a call returned; panics if it returned anything else.
pub fn refused(r: Result<(), MmuError>) -> Refusals {
    match r {
        Err(MmuError::Refused(f)) => f,
        other => panic!("expected refusals, got {other:?}"),
    }
}

/// The refusals of the last report.
pub fn listed<const E: usize, const R: usize>(l: &Lazy<E, R>) -> Vec<Refusal> {
    l.last_refusals().copied().collect()
}

/// The last report's refusals as (request, error).
pub fn listed_requests<const E: usize, const R: usize>(
    l: &Lazy<E, R>,
) -> Vec<(Option<Request>, XenError)> {
    l.last_refusals().map(|r| (r.request, r.error)).collect()
}

/// The strict in-order reference: each request issued at once, one hypercall each, in order.
/// Returns the refused ones with Xen's error.
pub fn strict(model: &mut Model, requests: &[Request]) -> Vec<(Option<Request>, XenError)> {
    let mut refused = Vec::new();
    for &r in requests {
        let result = match r {
            Request::SetPte { ptr, val, .. } | Request::SetTableEntry { ptr, val } => model
                .mmu_update(&[pt_update(ptr, val)])
                .map_err(|e| e.error),
            Request::TableOp(op) => model.mmuext_op(&[op.to_mmuext()]).map_err(|e| e.error),
            Request::UpdateVaMapping { va, val, flags } => model.update_va_mapping(va, val, flags),
        };
        if let Err(e) = result {
            refused.push((Some(r), e));
        }
    }
    refused
}
