//! Whether kernels may take their CPU-specific fast paths (the AVX-512, AVX2 and NEON
//! versions picked at run time) or must take the portable ones: a switch the tests use to
//! run the paths a machine without AVX-512 (every ARM board) takes, and that a user who
//! suspects a kernel can set (`PSTRAIN_PORTABLE_KERNELS=1`).
//!
//! Every kernel with a fast path keeps its portable path beside it and checks `enabled()`
//! before choosing; results that the code promises to be bit-identical across paths are
//! tested so.

use std::sync::atomic::{AtomicU8, Ordering};

/// The environment variable that turns the fast paths off for a process.
pub const PORTABLE_ENV: &str = "PSTRAIN_PORTABLE_KERNELS";

const UNREAD: u8 = 0;
const FAST: u8 = 1;
const PORTABLE: u8 = 2;

static CHOICE: AtomicU8 = AtomicU8::new(UNREAD);

/// Whether fast paths may run: yes unless `force_portable(true)` was called, or the
/// environment says `PSTRAIN_PORTABLE_KERNELS=1` (read once).
pub fn enabled() -> bool {
    match CHOICE.load(Ordering::Relaxed) {
        FAST => true,
        PORTABLE => false,
        _ => {
            let portable = std::env::var(PORTABLE_ENV).is_ok_and(|v| v == "1" || v == "true");
            let choice = if portable { PORTABLE } else { FAST };
            // A racing `force_portable` wins: only an unread choice is filled in.
            let _ = CHOICE.compare_exchange(UNREAD, choice, Ordering::Relaxed, Ordering::Relaxed);
            CHOICE.load(Ordering::Relaxed) == FAST
        }
    }
}

/// Makes every kernel of this process take its portable path (`true`) or its fast path where
/// the CPU has one (`false`), from the next call on.
pub fn force_portable(portable: bool) {
    CHOICE.store(if portable { PORTABLE } else { FAST }, Ordering::Relaxed);
}
