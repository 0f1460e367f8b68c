//! Typed frame numbers, machine addresses and page-table entry values.
//!
//! A 64-bit PV guest juggles three kinds of "physical" number: pseudo-physical frames ([`Pfn`],
//! the guest's own contiguous view), machine frames ([`Mfn`], what page tables and hypercalls
//! hold) and machine addresses ([`MachAddr`], e.g. of one page-table entry for `mmu_update`).
//! Mixing them up is the classic PV bug; as distinct types they cannot be swapped. Virtual
//! addresses are `x86_64::VirtAddr` (always canonical).

use core::fmt;

use x86_64::structures::paging::PageTableFlags;

/// Bytes in a page (and in a page table).
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
/// Entries in one page table.
pub const ENTRIES_PER_TABLE: u64 = 512;
/// Bytes in one page-table entry.
pub const ENTRY_SIZE: u64 = 8;

/// Machine addresses have 52 bits on x86-64, so a machine frame number has 40.
const MFN_LIMIT: u64 = 1 << (52 - PAGE_SHIFT);
/// The frame bits of a page-table entry.
const FRAME_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// A pseudo-physical frame number: an index into the domain's P2M.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pfn(u64);

impl Pfn {
    pub const fn new(n: u64) -> Pfn {
        Pfn(n)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The frame `n` further on, if that does not overflow.
    pub const fn checked_add(self, n: u64) -> Option<Pfn> {
        match self.0.checked_add(n) {
            Some(v) => Some(Pfn(v)),
            None => None,
        }
    }
}

/// A machine frame number (always below 2^40).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mfn(u64);

impl Mfn {
    /// `None` if `n` cannot be a machine frame (beyond 52-bit machine addresses).
    pub const fn new(n: u64) -> Option<Mfn> {
        if n < MFN_LIMIT { Some(Mfn(n)) } else { None }
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// Machine address of this frame's first byte.
    pub const fn addr(self) -> MachAddr {
        MachAddr(self.0 << PAGE_SHIFT)
    }

    /// Machine address of entry `index` (0..512) of the page table in this frame.
    pub const fn entry(self, index: u64) -> Option<MachAddr> {
        if index < ENTRIES_PER_TABLE {
            Some(MachAddr((self.0 << PAGE_SHIFT) + index * ENTRY_SIZE))
        } else {
            None
        }
    }
}

/// A machine address (below 2^52).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachAddr(u64);

impl MachAddr {
    /// `None` beyond 52-bit machine addresses.
    pub const fn new(a: u64) -> Option<MachAddr> {
        if a < MFN_LIMIT << PAGE_SHIFT {
            Some(MachAddr(a))
        } else {
            None
        }
    }

    /// The low 52 bits of `a` (for decoding a value built from a `MachAddr`).
    pub const fn new_truncate(a: u64) -> MachAddr {
        MachAddr(a & ((MFN_LIMIT << PAGE_SHIFT) - 1))
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    pub const fn mfn(self) -> Mfn {
        Mfn(self.0 >> PAGE_SHIFT)
    }

    /// Offset inside the frame.
    pub const fn page_offset(self) -> u64 {
        self.0 % PAGE_SIZE
    }

    /// Is this the address of a whole page-table entry (8-byte aligned)?
    pub const fn is_entry_aligned(self) -> bool {
        self.0.is_multiple_of(ENTRY_SIZE)
    }

    /// Index of the entry at this address in its table (the address must be entry aligned).
    pub const fn entry_index(self) -> u64 {
        self.page_offset() / ENTRY_SIZE
    }

    /// The entry `n` slots further on, if it is still in the same table.
    pub const fn entry_in_table(self, n: u64) -> Option<MachAddr> {
        if n < ENTRIES_PER_TABLE && self.entry_index() + n < ENTRIES_PER_TABLE {
            Some(MachAddr(self.0 + n * ENTRY_SIZE))
        } else {
            None
        }
    }
}

/// A page-table entry as Xen sees it: a machine frame and flags.
///
/// Any 64-bit value can be handed to Xen (it refuses what it does not accept), so
/// [`Pte::from_raw`] takes any value; [`Pte::new`] builds the ordinary kind.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Pte(u64);

impl Pte {
    /// Not present.
    pub const NONE: Pte = Pte(0);

    /// Map machine frame `mfn` with `flags`.
    pub const fn new(mfn: Mfn, flags: PageTableFlags) -> Pte {
        Pte((mfn.0 << PAGE_SHIFT) | (flags.bits() & !FRAME_MASK))
    }

    /// Exactly these 64 bits.
    pub const fn from_raw(raw: u64) -> Pte {
        Pte(raw)
    }

    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The machine frame (meaningful when present).
    pub const fn mfn(self) -> Mfn {
        Mfn((self.0 & FRAME_MASK) >> PAGE_SHIFT)
    }

    pub const fn flags(self) -> PageTableFlags {
        PageTableFlags::from_bits_truncate(self.0 & !FRAME_MASK)
    }

    pub const fn is_present(self) -> bool {
        self.0 & PageTableFlags::PRESENT.bits() != 0
    }

    /// The same flags on another frame.
    pub const fn with_mfn(self, mfn: Mfn) -> Pte {
        Pte((self.0 & !FRAME_MASK) | (mfn.0 << PAGE_SHIFT))
    }
}

macro_rules! hex_debug {
    ($($t:ident),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({:#x})"), self.0)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    )*};
}
hex_debug!(Pfn, Mfn, MachAddr, Pte);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_numbers_and_addresses_reject_what_cannot_exist() {
        assert_eq!(Mfn::new(MFN_LIMIT - 1).map(Mfn::get), Some(MFN_LIMIT - 1));
        assert!(Mfn::new(MFN_LIMIT).is_none());
        assert!(Mfn::new(u64::MAX).is_none());
        assert!(MachAddr::new(u64::MAX).is_none());
        let m = Mfn::new(0x1234).unwrap();
        assert_eq!(m.entry(511).unwrap().get(), 0x1234 * 4096 + 511 * 8);
        assert!(m.entry(512).is_none());
        assert!(Pfn::new(u64::MAX).checked_add(1).is_none());
    }

    #[test]
    fn entries_stay_inside_their_table() {
        let e = Mfn::new(7).unwrap().entry(500).unwrap();
        assert_eq!(e.entry_index(), 500);
        assert_eq!(e.entry_in_table(11).unwrap().entry_index(), 511);
        assert!(e.entry_in_table(12).is_none());
        assert!(e.entry_in_table(u64::MAX).is_none());
    }

    #[test]
    fn pte_keeps_frame_and_flags_apart() {
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        let p = Pte::new(Mfn::new(0xabcde).unwrap(), flags);
        assert_eq!(p.raw(), 0xabcde003);
        assert_eq!(p.mfn().get(), 0xabcde);
        assert_eq!(p.flags(), flags);
        assert!(p.is_present() && !Pte::NONE.is_present());
        assert_eq!(p.with_mfn(Mfn::new(1).unwrap()).raw(), 0x1003);
        // A raw value with every bit set still yields an in-range frame.
        assert_eq!(Pte::from_raw(u64::MAX).mfn().get(), MFN_LIMIT - 1);
    }
}
