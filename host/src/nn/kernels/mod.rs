//! EIR's own CPU kernels, shared by the backends: the f32 GEMM with its fused epilogue
//! ([`sgemm`], its work shared out by [`split`]), fused attention ([`attention`]), vectorised activations ([`act`]), parallel loops that do not sleep mid-pass ([`par`]) and the run-time choice of vector instructions ([`simd`]). Every kernel keeps a
//! portable path and is tested against a plain reference on ragged shapes.

pub(crate) mod act;
pub(crate) mod attention;
pub(crate) mod par;
pub(crate) mod quant;
pub(crate) mod sgemm;
pub(crate) mod simd;
pub(crate) mod split;

/// `len` copies of `v`, allocated and then written, never as `vec![0; len]`: that asks the
/// allocator for zeroed memory, which jemalloc provides for a reused large block by handing its
/// pages back to the kernel (`madvise`), so the kernel then page-faults and clears every page
/// again. Per-job scratch allocated so was most of an EfficientNet pass's page faults (`perf
/// record -e page-faults`: about 200 per pass at batch 1, 1,100 at batch 8).
pub(crate) fn filled<T: Clone>(len: usize, v: T) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    out.resize(len, v);
    out
}

/// The median time of `runs` calls of `f`, after one untimed call (the kernels' timing tests).
#[cfg(test)]
pub(crate) fn median_time(runs: usize, f: &mut dyn FnMut()) -> std::time::Duration {
    f();
    let mut v: Vec<std::time::Duration> = (0..runs.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}
