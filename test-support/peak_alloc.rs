//! A global allocator for property tests that records the largest single allocation a thread
//! made since the last reset: decoders fed hostile bytes must not allocate beyond a bound
//! proportional to their input. Included by path into each crate's fuzz tests.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Peak;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|p| p.set(p.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|p| p.set(p.get().max(new)));
        unsafe { System.realloc(ptr, layout, new) }
    }
}

/// Runs `decode` on `input` and fails if any one allocation exceeded `fixed + per_byte *
/// input.len()` bytes.
pub fn bounded<T>(
    what: &str,
    input: &[u8],
    fixed: usize,
    per_byte: usize,
    decode: impl FnOnce(&[u8]) -> T,
) -> T {
    LARGEST.with(|p| p.set(0));
    let out = decode(input);
    let largest = LARGEST.with(|p| p.get());
    let bound = fixed + per_byte * input.len();
    assert!(
        largest <= bound,
        "{what}: one allocation of {largest} bytes for {} input bytes (bound {bound})",
        input.len()
    );
    out
}

/// `base` with some bytes replaced, then cut short or extended.
pub fn mutate(base: &[u8], edits: &[(usize, u8)], cut: Option<usize>, tail: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    for &(at, byte) in edits {
        if !out.is_empty() {
            let i = at % out.len();
            out[i] = byte;
        }
    }
    if let Some(c) = cut {
        out.truncate(c % (out.len() + 1));
    }
    out.extend_from_slice(tail);
    out
}
