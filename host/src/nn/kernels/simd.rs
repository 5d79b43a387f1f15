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

/// Asks for the cache lines of `data` into L2 ahead of a read (a hint: it reads nothing and
/// never faults). Where a loop's next operand is a short run far from the one it reads now
/// (the next block's weights of a depthwise convolution), the hardware prefetchers do not
/// fetch it before it is needed.
#[inline]
pub(crate) fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let bytes = std::mem::size_of_val(data);
        let start = data.as_ptr().cast::<i8>();
        // Every 64 bytes from the start, and the last byte: `data` need not start on a line.
        for at in (0..bytes).step_by(64).chain(bytes.checked_sub(1)) {
            // SAFETY: SSE is part of x86_64; a prefetch of an address inside `data` reads
            // nothing and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(start.wrapping_add(at)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// A 16-lane mask of the lanes below `n` (all of them from 16 on), for masked AVX-512 loads
/// and stores of a row's last values.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn lanes16(n: usize) -> std::arch::x86_64::__mmask16 {
    if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as std::arch::x86_64::__mmask16 }
}

/// Transposes 16 rows of 16 floats held in registers (row `i` in `r[i]`; column `j` comes out
/// in `r[j]`): unpacks of pairs of rows, then of pairs of pairs, then two rounds of 128-bit
/// lane shuffles. The depthwise kernel's layout changes and [`super::act::transpose`] share it.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(crate) unsafe fn transpose16(r: &mut [std::arch::x86_64::__m512; 16]) {
    use std::arch::x86_64::*;
    // Loops, not `array::from_fn`: a closure would not inherit the caller's AVX-512 and would
    // run each shuffle as a call.
    // SAFETY (all below): register shuffles only; the caller's CPU has AVX-512F.
    unsafe {
        let mut t = *r;
        for i in 0..16 {
            let (a, b) = (r[i & !1], r[i | 1]);
            t[i] = if i % 2 == 0 { _mm512_unpacklo_ps(a, b) } else { _mm512_unpackhi_ps(a, b) };
        }
        // u[4g + j]: in each 128-bit lane k, column 4k + j of rows 4g..4g + 4.
        let mut u = t;
        for i in 0..16 {
            let (g, j) = (i / 4, i % 4);
            let (a, b) = (_mm512_castps_pd(t[4 * g + j / 2]), _mm512_castps_pd(t[4 * g + j / 2 + 2]));
            u[i] = _mm512_castpd_ps(if j % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) });
        }
        // v[8h + j]: rows 8h..8h + 8; lanes 0 and 1 hold columns j and 8 + j (or 4 + j and
        // 12 + j for v[8h + 4 + j]).
        let mut v = u;
        for h in 0..2 {
            for i in 0..8 {
                let (a, b) = (u[8 * h + i % 4], u[8 * h + 4 + i % 4]);
                v[8 * h + i] =
                    if i < 4 { _mm512_shuffle_f32x4::<0x88>(a, b) } else { _mm512_shuffle_f32x4::<0xdd>(a, b) };
            }
        }
        for col in 0..16 {
            let j = col % 4 + 4 * ((col / 4) % 2);
            let (a, b) = (v[j], v[8 + j]);
            r[col] = if col >= 8 { _mm512_shuffle_f32x4::<0xdd>(a, b) } else { _mm512_shuffle_f32x4::<0x88>(a, b) };
        }
    }
}

/// Transposes 8 rows of 8 floats held in registers, as [`transpose16`] does 16.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(crate) unsafe fn transpose8(r: &mut [std::arch::x86_64::__m256; 8]) {
    use std::arch::x86_64::*;
    // SAFETY (all below): register shuffles only; the caller's CPU has AVX. Loops, as above.
    unsafe {
        let mut t = *r;
        for i in 0..8 {
            let (a, b) = (r[i & !1], r[i | 1]);
            t[i] = if i % 2 == 0 { _mm256_unpacklo_ps(a, b) } else { _mm256_unpackhi_ps(a, b) };
        }
        let mut u = t;
        for i in 0..8 {
            let (g, j) = (i / 4, i % 4);
            let (a, b) = (_mm256_castps_pd(t[4 * g + j / 2]), _mm256_castps_pd(t[4 * g + j / 2 + 2]));
            u[i] = _mm256_castpd_ps(if j % 2 == 0 { _mm256_unpacklo_pd(a, b) } else { _mm256_unpackhi_pd(a, b) });
        }
        for col in 0..8 {
            let (a, b) = (u[col % 4], u[4 + col % 4]);
            r[col] = if col < 4 { _mm256_permute2f128_ps::<0x20>(a, b) } else { _mm256_permute2f128_ps::<0x31>(a, b) };
        }
    }
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
