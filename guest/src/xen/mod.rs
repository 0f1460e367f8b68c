//! What Xen gives the kernel: `start_info` ([`start_info::BootInfo`]), the shared pages
//! (shared info, the console ring) over [`shared::SharedPageSlot`]s, the P2M and M2P
//! (bounds-checked), the console, shutdown, event channels (masking, handlers, the upcall's
//! demultiplexer) and time (system time, the tick).

#[macro_use]
pub mod console;
pub mod events;
pub mod p2m;
pub mod shared;
pub mod shutdown;
pub mod start_info;
pub mod time;

pub use start_info::{BootInfo, Role, boot_info};
