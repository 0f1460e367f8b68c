//! Outside lazy mode one `set_pte` is one `mmu_update`, at once.

use hypercalls::calls::issued;

use super::util::{check_mapped, check_unmapped, marked_region};
use crate::framework::runner::{Context, TestOutcome, failed};
use crate::mm::pte;
use crate::mm::region::Map;

pub fn eager_set_pte(_: &Context) -> TestOutcome {
    let r = marked_region(1, 1)?;
    ensure!(!pte::is_active(), "lazy mode active outside any section");
    let (raw0, c0) = (issued(), pte::counters());
    r.set_pte(0, Map::Frame(0)).map_err(failed)?;
    let d = pte::counters().since(&c0);
    ensure_eq!(issued() - raw0, 1, "raw hypercalls for one eager set_pte");
    ensure_eq!(
        (d.hypercalls, d.multicalls, d.requests),
        (1, 0, 1),
        "counters"
    );
    check_mapped(&r, 0, 0)?;
    // Write through the kernel's own mapping of the frame, read back through the new one: the
    // same frame.
    r.write(0, 7, 0xfeed_f00d).map_err(failed)?;
    let back = r.probe(0, 7).map_err(|f| failed(format_args!("{f:?}")))?;
    ensure_eq!(back, 0xfeed_f00d, "value read through the new mapping");
    r.set_pte(0, Map::None).map_err(failed)?;
    pte::flush_tlb_local().map_err(failed)?;
    check_unmapped(&r, 0)
}
