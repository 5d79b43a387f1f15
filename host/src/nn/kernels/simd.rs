//! Which vector instructions this CPU has, for the kernels compiled with `target_feature` (their
//! loops are vectorised 8-wide with AVX2 + FMA, or 16-wide with AVX-512). `std` caches the
//! answers, so asking per call is cheap. Tests can cap the level ([`cap`]) so that every path
//! runs on an AVX-512 machine; every path computes the same results, so a cap set by one test
//! never changes another's outcome.

use std::sync::atomic::{AtomicU8, Ordering};

/// A vector instruction level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust (the compiler's baseline vectorisation); only tests cap the kernels to it.
    #[cfg_attr(not(test), allow(dead_code))]
    Portable = 0,
    /// AVX2 + FMA.
    Avx2 = 1,
    /// AVX-512F.
    Avx512 = 2,
}

/// The highest level the kernels may use (tests lower it).
static CAP: AtomicU8 = AtomicU8::new(Level::Avx512 as u8);

/// Lets the kernels use at most `level` until the returned guard is dropped.
#[cfg(test)]
pub fn cap(level: Level) -> impl Drop {
    struct Restore(u8);
    impl Drop for Restore {
        fn drop(&mut self) {
            CAP.store(self.0, Ordering::Relaxed);
        }
    }
    Restore(CAP.swap(level as u8, Ordering::Relaxed))
}

fn allowed(level: Level) -> bool {
    CAP.load(Ordering::Relaxed) >= level as u8
}

/// Whether this CPU can run the AVX2 + FMA paths.
pub fn fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        allowed(Level::Avx2) && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = allowed;
        false
    }
}

/// Whether this CPU can run the AVX-512 paths (AVX-512F includes FMA).
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        allowed(Level::Avx512) && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The levels this CPU has, lowest first (for tests that run every path).
#[cfg(test)]
pub fn levels() -> Vec<Level> {
    let _all = cap(Level::Avx512);
    let mut v = vec![Level::Portable];
    if fma() {
        v.push(Level::Avx2);
    }
    if avx512() {
        v.push(Level::Avx512);
    }
    v
}
