//! The global allocator (feature `inference`: burn's tensors live on the heap), instrumented:
//! it counts the bytes in use and their high-water mark, so the node's heap need is measured
//! rather than guessed (docs/hil.md).
//!
//! The arena is a `NOLOAD` RAM section ([`HEAP_BYTES`]), so the startup code does not spend
//! time zeroing it; [`init`] must run once before the first allocation.

use core::alloc::{GlobalAlloc, Layout};
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use embedded_alloc::LlffHeap;

/// The arena: the model's measured peak (docs/hil.md) with room to spare; the AN386 has 4 MiB
/// of data RAM.
pub const HEAP_BYTES: usize = 1536 * 1024;

#[unsafe(link_section = ".uninit.ember_heap")]
static mut ARENA: [MaybeUninit<u8>; HEAP_BYTES] = [MaybeUninit::uninit(); HEAP_BYTES];

/// A first-fit heap that counts what it hands out.
pub struct Counting {
    heap: LlffHeap,
    used: AtomicUsize,
    peak: AtomicUsize,
    ready: AtomicBool,
}

#[global_allocator]
static ALLOCATOR: Counting = Counting {
    heap: LlffHeap::empty(),
    used: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
    ready: AtomicBool::new(false),
};

/// Gives the allocator its arena (once; later calls do nothing).
pub fn init() {
    if ALLOCATOR.ready.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: runs once (the flag above); the arena is used by nothing else.
    unsafe { ALLOCATOR.heap.init((&raw mut ARENA) as usize, HEAP_BYTES) }
}

/// Bytes allocated now.
pub fn used() -> usize {
    ALLOCATOR.used.load(Ordering::Relaxed)
}

/// The most bytes allocated at once since boot or the last [`reset_peak`].
pub fn peak() -> usize {
    ALLOCATOR.peak.load(Ordering::Relaxed)
}

/// Starts a new high-water mark from what is allocated now.
pub fn reset_peak() {
    ALLOCATOR.peak.store(used(), Ordering::Relaxed);
}

// SAFETY: forwards to LlffHeap, which is a sound global allocator; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { self.heap.alloc(layout) };
        if !p.is_null() {
            let now = self.used.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.heap.dealloc(ptr, layout) };
        self.used.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}
