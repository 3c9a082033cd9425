//! A counting global allocator (feature `count-allocs`): `flows` reports heap allocations per
//! request with it. Counts per thread, so that nothing but the measured thread's work is counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static COUNTS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

fn bump(realloc: bool) {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = COUNTS.try_with(|c| {
        let (a, r) = c.get();
        c.set(if realloc { (a, r + 1) } else { (a + 1, r) });
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; only a count is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump(false);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump(false);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump(true);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// (allocations, reallocations) on this thread so far.
pub fn count() -> (u64, u64) {
    COUNTS.try_with(|c| c.get()).unwrap_or((0, 0))
}
