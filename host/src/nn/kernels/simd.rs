//! Which vector instructions this CPU has, for the kernels compiled with `target_feature` (their
//! loops are vectorised 8-wide with AVX2 + FMA, or 16-wide with AVX-512). `std` caches the
//! answers, so asking per call is cheap. Tests can cap the level ([`cap`]) so that every path
//! runs on an AVX-512 machine.

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

/// Lets the kernels use at most `level` until the returned guard is dropped. Tests that cap
/// run one at a time (the guard holds a lock): paths agree only within a tolerance, so a cap
/// set by one test must not change the level under another that compares two runs exactly.
#[cfg(test)]
pub fn cap(level: Level) -> impl Drop {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    struct Restore(u8, #[allow(dead_code)] std::sync::MutexGuard<'static, ()>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CAP.store(self.0, Ordering::Relaxed);
        }
    }
    let held = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    Restore(CAP.swap(level as u8, Ordering::Relaxed), held)
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

/// An output buffer's base pointer, shared by the parallel units of one kernel call, each of
/// which writes only its own disjoint part (the kernel's contract says which).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: the pointer is only written through, and the kernels that share it give every unit a
// part of the buffer no other unit writes (each kernel's SAFETY comments name the parts).
#[cfg(target_arch = "x86_64")]
unsafe impl Send for SharedOut {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SharedOut {}

#[cfg(target_arch = "x86_64")]
impl SharedOut {
    /// The element at `offset` (a method, so closures capture the whole value).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// A 16-lane mask of the lanes below `n` (all of them from 16 on), for masked AVX-512 loads
/// and stores of a row's last values.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn lanes16(n: usize) -> std::arch::x86_64::__mmask16 {
    if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as std::arch::x86_64::__mmask16 }
}

/// The levels this CPU has, lowest first (for tests that run every path).
#[cfg(test)]
pub fn levels() -> Vec<Level> {
    let mut v = vec![Level::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            v.push(Level::Avx2);
        }
        if std::is_x86_feature_detected!("avx512f") {
            v.push(Level::Avx512);
        }
    }
    v
}
