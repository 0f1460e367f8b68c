//! Memory management: the lazy-MMU batching core (hardware independent) and, in the kernel, the
//! frame allocator, page-table walk and `set_pte`/`set_ptes` built on it.
