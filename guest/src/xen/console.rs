//! The console: `console_io` for the initial domain, the PV console ring for any other domain
//! (Xen drops a domU's `console_io` output on release builds). One writer behind `print!`.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering, fence};

use hypercalls::abi::{XENCONS_OUTPUT_BYTES, XenconsInterface};
use hypercalls::calls;

#[derive(Clone, Copy)]
enum Backend {
    /// Nothing set up yet: output goes to `console_io`, which a release Xen drops for a domU.
    None,
    /// `console_io(CONSOLEIO_write)`: the initial domain's console.
    Hypervisor,
    /// The shared ring and the event channel that tells the backend to look at it.
    Ring {
        ring: *mut XenconsInterface,
        evtchn: u32,
    },
}

// SAFETY: the ring pointer is only used through volatile accesses to the shared console page,
// which the backend domain changes concurrently anyway; it is never turned into a reference.
unsafe impl Send for Backend {}
// SAFETY: as above.
unsafe impl Sync for Backend {}

/// The writer: one at a time behind [`CONSOLE`].
pub struct Console;

/// Bytes the backend accepted (console_io returned success, or the ring published them).
static BYTES_ACCEPTED: AtomicU64 = AtomicU64::new(0);

/// Bytes the console backend has accepted so far.
pub fn bytes_accepted() -> u64 {
    BYTES_ACCEPTED.load(Ordering::SeqCst)
}

static CONSOLE: super::events::IrqMutex<Console> = super::events::IrqMutex::new(Console);
/// Chosen once at boot.
static BACKEND: spin::Once<Backend> = spin::Once::new();

fn backend() -> Backend {
    BACKEND.get().copied().unwrap_or(Backend::None)
}

/// Use Xen's own console (initial domain).
pub fn init_hypervisor_console() {
    BACKEND.call_once(|| Backend::Hypervisor);
}

/// Map a domU's PV console page and write to it from now on (`Ok(false)` for the initial
/// domain, which has none).
pub fn init_ring_console(info: &super::BootInfo) -> Result<bool, hypercalls::XenError> {
    let Some(ring) = super::shared::map_console_ring(info)? else {
        return Ok(false);
    };
    let evtchn = info.console_evtchn;
    BACKEND.call_once(|| Backend::Ring { ring, evtchn });
    Ok(true)
}

/// The name of the console in use, for the banner.
pub fn describe() -> &'static str {
    match backend() {
        Backend::None => "none",
        Backend::Hypervisor => "console_io",
        Backend::Ring { .. } => "PV console ring",
    }
}

/// Wait (yielding the CPU, at most `max_yields` times) until the console backend has consumed
/// everything written. True when it has; always true for `console_io`, which is synchronous.
pub fn drain(max_yields: u32) -> bool {
    let mut yields = 0u32;
    drain_until(|| {
        yields += 1;
        yields > max_yields
    })
}

/// [`drain`] bounded by system time rather than by yields: waits up to `timeout_ns` of Xen's
/// system time (a loaded host may take many yields before the backend runs). Before shared
/// info is mapped (no system time) it gives up at once.
pub fn drain_within(timeout_ns: u64) -> bool {
    let start = super::time::now_ns();
    drain_until(|| start == 0 || super::time::now_ns().saturating_sub(start) > timeout_ns)
}

fn drain_until(mut give_up: impl FnMut() -> bool) -> bool {
    let ring = match backend() {
        Backend::Ring { ring, evtchn } => {
            let _ = calls::evtchn_send(evtchn);
            ring
        }
        _ => return true,
    };
    loop {
        // SAFETY: `ring` maps the console page; the backend advances `out_cons` concurrently.
        let (cons, prod) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*ring).out_cons),
                core::ptr::read_volatile(&raw const (*ring).out_prod),
            )
        };
        if cons == prod {
            return true;
        }
        if give_up() {
            return false;
        }
        calls::yield_cpu();
    }
}

impl Console {
    fn write_bytes(&mut self, bytes: &[u8]) {
        match backend() {
            // Before the console is set up (e.g. a panic while validating start_info) try Xen's
            // own console: a debug build of Xen shows a domU's output there too.
            Backend::None | Backend::Hypervisor => {
                if calls::console_write(bytes).is_ok() {
                    BYTES_ACCEPTED.fetch_add(bytes.len() as u64, Ordering::SeqCst);
                }
            }
            Backend::Ring { ring, evtchn } => write_ring(ring, evtchn, bytes),
        }
    }
}

fn write_ring(ring: *mut XenconsInterface, evtchn: u32, mut bytes: &[u8]) {
    let size = XENCONS_OUTPUT_BYTES as u32;
    while !bytes.is_empty() {
        // SAFETY: `ring` maps the console page (see `init_ring_console`). The backend writes
        // `out_cons` concurrently, hence the volatile accesses and fences.
        let (cons, prod) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*ring).out_cons),
                core::ptr::read_volatile(&raw const (*ring).out_prod),
            )
        };
        fence(Ordering::SeqCst);
        let free = size - prod.wrapping_sub(cons);
        if free == 0 {
            // Full: poke the backend and give it the CPU.
            let _ = calls::evtchn_send(evtchn);
            calls::yield_cpu();
            continue;
        }
        let n = core::cmp::min(free as usize, bytes.len());
        for (i, b) in bytes[..n].iter().enumerate() {
            let idx = (prod.wrapping_add(i as u32) & (size - 1)) as usize;
            // SAFETY: idx < XENCONS_OUTPUT_BYTES; the slot lies between prod and cons + size, so it is ours.
            unsafe { core::ptr::write_volatile(&raw mut (*ring).output[idx], *b) };
        }
        fence(Ordering::SeqCst);
        // SAFETY: as above; publishing the new producer index after the data.
        unsafe {
            core::ptr::write_volatile(&raw mut (*ring).out_prod, prod.wrapping_add(n as u32))
        };
        BYTES_ACCEPTED.fetch_add(n as u64, Ordering::SeqCst);
        let _ = calls::evtchn_send(evtchn);
        bytes = &bytes[n..];
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let _ = CONSOLE.lock().write_fmt(args);
}

/// A writer for the panic and trap paths (through [`emergency_print`]).
pub struct Emergency;

impl Write for Emergency {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        emergency_print(format_args!("{s}"));
        Ok(())
    }
}

/// For the panic and trap paths: take the console even if the code that failed held it.
pub fn emergency_print(args: fmt::Arguments) {
    // The code that failed may hold the lock and never release it: write without it then (the
    // lock only keeps lines whole; the ring is shared with the backend domain anyway).
    match CONSOLE.try_lock() {
        Some(mut c) => {
            let _ = c.write_fmt(args);
        }
        None => {
            let _ = Console.write_fmt(args);
        }
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::xen::console::_print(format_args!($($arg)*)));
}

#[macro_export]
macro_rules! println {
    () => ($crate::print!("\n"));
    ($($arg:tt)*) => ($crate::xen::console::_print(format_args!("{}\n", format_args!($($arg)*))));
}
