//! Memory management: the lazy-MMU batching core (hardware independent) and, in the kernel, the
//! frame allocator, page-table walk and `set_pte`/`set_ptes` built on it.

pub mod lazy;

#[cfg(test)]
mod lazy_tests;
#[cfg(test)]
pub mod model;
