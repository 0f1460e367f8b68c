//! Event channels: masking (the kernel's interrupt-disable: a PV kernel runs in ring 3 and has
//! no `cli`), per-port handlers, and the demultiplexer the upcall runs.
//!
//! Masking is vCPU 0's `evtchn_upcall_mask`: Xen delivers an upcall only when
//! `evtchn_upcall_pending` is set and the mask is clear, and sets the mask itself on delivery.
//! Unmasking by a plain store delivers a pending event only at the next entry into Xen, so
//! [`restore`] makes a cheap hypercall when something is pending. [`IrqMutex`] is a spin lock
//! held with events masked: every lock the kernel takes in task context is one, so neither an
//! upcall handler nor a preempting task can find a lock held by the code it interrupted.
//!
//! Demultiplexing follows the 2-level ABI (as Mini-OS does): clear `upcall_pending`, take
//! `pending_sel` with an exchange, for each selected word take the pending and unmasked ports,
//! clear each port's pending bit atomically before its handler runs, and start again while
//! `upcall_pending` was set again. All ports are masked at [`init`]; a port is unmasked with
//! `EVTCHNOP_unmask` when a handler is bound to it.

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering, compiler_fence};

use hypercalls::{XenError, calls};

use super::shared::shared_info_ptr;

/// Ports with a handler slot (the kernel binds a handful; Xen hands out the lowest free ones).
pub const MAX_PORTS: usize = 256;
const WORDS: usize = 64;

fn vcpu_mask() -> Option<&'static AtomicU8> {
    let si = shared_info_ptr()?;
    // SAFETY: the shared-info page stays mapped for the domain's life; the byte is shared with
    // Xen, which only ever reads and writes it whole: an atomic view of it is sound.
    Some(unsafe { AtomicU8::from_ptr(&raw mut (*si).vcpu_info[0].evtchn_upcall_mask) })
}

fn vcpu_pending() -> Option<&'static AtomicU8> {
    let si = shared_info_ptr()?;
    // SAFETY: as for `vcpu_mask`.
    Some(unsafe { AtomicU8::from_ptr(&raw mut (*si).vcpu_info[0].evtchn_upcall_pending) })
}

fn pending_sel() -> Option<&'static AtomicU64> {
    let si = shared_info_ptr()?;
    // SAFETY: as for `vcpu_mask`; Xen sets bits of this word with atomic operations.
    Some(unsafe { AtomicU64::from_ptr(&raw mut (*si).vcpu_info[0].evtchn_pending_sel) })
}

/// Word `w` (< 64) of the pending or the mask bitmap.
fn bitmap_word(mask: bool, w: usize) -> Option<&'static AtomicU64> {
    let si = shared_info_ptr()?;
    // SAFETY: as for `vcpu_mask`; `w` indexes the 64-word arrays (callers keep it below 64),
    // which Xen changes with atomic bit operations.
    Some(unsafe {
        let words = if mask {
            &raw mut (*si).evtchn_mask
        } else {
            &raw mut (*si).evtchn_pending
        };
        AtomicU64::from_ptr(&raw mut (*words)[w])
    })
}

/// Mask events; returns whether they were masked already.
pub fn mask() -> bool {
    let Some(m) = vcpu_mask() else { return true };
    let was = m.swap(1, Ordering::SeqCst) != 0;
    compiler_fence(Ordering::SeqCst);
    was
}

/// Unmask events; take any pending one at once.
pub fn unmask() {
    let Some(m) = vcpu_mask() else { return };
    compiler_fence(Ordering::SeqCst);
    m.store(0, Ordering::SeqCst);
    if vcpu_pending().is_some_and(|p| p.load(Ordering::SeqCst) != 0) {
        // Any hypercall makes Xen deliver on its way back (Mini-OS: force_evtchn_callback).
        let _ = calls::xen_version();
    }
}

/// Back to what [`mask`] returned.
pub fn restore(was_masked: bool) {
    if !was_masked {
        unmask();
    }
}

/// Are events masked?
pub fn masked() -> bool {
    vcpu_mask().is_none_or(|m| m.load(Ordering::SeqCst) != 0)
}

/// Events masked while it lives (restored as they were when dropped).
pub struct IrqGuard {
    was_masked: bool,
}

impl IrqGuard {
    pub fn new() -> IrqGuard {
        IrqGuard { was_masked: mask() }
    }
}

impl Default for IrqGuard {
    fn default() -> Self {
        IrqGuard::new()
    }
}

impl Drop for IrqGuard {
    fn drop(&mut self) {
        restore(self.was_masked);
    }
}

/// A spin lock held with events masked.
pub struct IrqMutex<T> {
    inner: spin::Mutex<T>,
}

/// The lock's guard: unlocks, then restores the mask.
pub struct IrqMutexGuard<'a, T> {
    guard: spin::MutexGuard<'a, T>,
    _irq: IrqGuard,
}

impl<T> IrqMutex<T> {
    pub const fn new(value: T) -> IrqMutex<T> {
        IrqMutex {
            inner: spin::Mutex::new(value),
        }
    }

    pub fn lock(&self) -> IrqMutexGuard<'_, T> {
        let irq = IrqGuard::new();
        IrqMutexGuard {
            guard: self.inner.lock(),
            _irq: irq,
        }
    }

    /// The lock if it is free (for reports from code that may have been interrupted holding it).
    pub fn try_lock(&self) -> Option<IrqMutexGuard<'_, T>> {
        let irq = IrqGuard::new();
        Some(IrqMutexGuard {
            guard: self.inner.try_lock()?,
            _irq: irq,
        })
    }
}

impl<T> core::ops::Deref for IrqMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> core::ops::DerefMut for IrqMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

/// A port's handler: called in the upcall with the port number.
pub type Handler = fn(u32);

static HANDLERS: IrqMutex<[Option<Handler>; MAX_PORTS]> = IrqMutex::new([None; MAX_PORTS]);
static UPCALLS: AtomicU64 = AtomicU64::new(0);
static UNHANDLED: AtomicU64 = AtomicU64::new(0);

/// Mask every port and events as a whole (the state handlers are bound from).
pub fn init() {
    mask();
    for w in 0..WORDS {
        if let Some(word) = bitmap_word(true, w) {
            word.store(u64::MAX, Ordering::SeqCst);
        }
    }
}

fn attach(port: u32, handler: Handler) -> Result<u32, XenError> {
    if port as usize >= MAX_PORTS {
        let _ = calls::evtchn_close(port);
        return Err(XenError::Range);
    }
    HANDLERS.lock()[port as usize] = Some(handler);
    calls::evtchn_unmask(port)?;
    Ok(port)
}

/// Bind `virq` on vCPU 0 to a new port handled by `handler`.
pub fn bind_virq(virq: u32, handler: Handler) -> Result<u32, XenError> {
    let port = calls::evtchn_bind_virq(virq, 0)?;
    attach(port, handler)
}

/// A new IPI port to vCPU 0 handled by `handler` ([`notify`] raises it; with events unmasked
/// the handler runs before `notify` returns).
pub fn bind_ipi(handler: Handler) -> Result<u32, XenError> {
    let port = calls::evtchn_bind_ipi(0)?;
    attach(port, handler)
}

/// Close `port` and forget its handler.
pub fn unbind(port: u32) -> Result<(), XenError> {
    if let Some(slot) = HANDLERS.lock().get_mut(port as usize) {
        *slot = None;
    }
    calls::evtchn_close(port)
}

/// Raise `port`.
pub fn notify(port: u32) -> Result<(), XenError> {
    calls::evtchn_send(port)
}

/// Upcalls taken so far.
pub fn upcalls() -> u64 {
    UPCALLS.load(Ordering::Relaxed)
}

/// Pending ports that had no handler.
pub fn unhandled() -> u64 {
    UNHANDLED.load(Ordering::Relaxed)
}

/// Handle every pending, unmasked port (the upcall, with events masked).
pub fn dispatch() {
    UPCALLS.fetch_add(1, Ordering::Relaxed);
    let (Some(upcall_pending), Some(sel)) = (vcpu_pending(), pending_sel()) else {
        return;
    };
    loop {
        upcall_pending.store(0, Ordering::SeqCst);
        let mut words = sel.swap(0, Ordering::SeqCst);
        while words != 0 {
            let w = words.trailing_zeros() as usize;
            words &= words - 1;
            let (Some(pending), Some(masks)) = (bitmap_word(false, w), bitmap_word(true, w)) else {
                continue;
            };
            let mut ports = pending.load(Ordering::SeqCst) & !masks.load(Ordering::SeqCst);
            while ports != 0 {
                let b = ports.trailing_zeros();
                ports &= ports - 1;
                // Clear before handling: a port raised again while its handler runs is not
                // lost.
                pending.fetch_and(!(1u64 << b), Ordering::SeqCst);
                let port = w as u32 * 64 + b;
                let handler = HANDLERS.lock().get(port as usize).copied().flatten();
                match handler {
                    Some(h) => h(port),
                    None => {
                        UNHANDLED.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if upcall_pending.load(Ordering::SeqCst) == 0 {
            break;
        }
    }
}
