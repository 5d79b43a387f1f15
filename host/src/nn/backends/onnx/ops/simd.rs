//! Which vector instructions this CPU has, for the kernels compiled with `target_feature` (their
//! loops are vectorised 8-wide with AVX2 + FMA, or 16-wide with AVX-512). `std` caches the
//! answers, so asking per call is cheap.

/// Whether this CPU can run the AVX2 + FMA paths.
pub fn fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU can run the AVX-512 paths (AVX-512F includes FMA).
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
