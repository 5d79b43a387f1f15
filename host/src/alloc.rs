//! The memory allocator of EIR's binaries: jemalloc, configured to keep freed pages for reuse.
//!
//! A model pass allocates the same activation sizes operator after operator and pass after pass.
//! glibc hands every allocation above 32 MiB straight back to the kernel and trims its heap, so each
//! operator faulted in and cleared fresh pages: on EfficientNet-Lite0 at batch 8 a quarter of the
//! pass was kernel time. jemalloc keeps freed pages (dirty pages decay over 10 s, returned by its
//! background thread when the host goes idle). Its default sends requests above 8 MiB to an arena
//! that purges at once, which is exactly the activations' case, hence `oversize_threshold:0`.
//! Measured with `scripts/bench.sh onnx` (EfficientNet-Lite0, batch 8): glibc 108 ms, jemalloc
//! with its defaults 108 ms, with this configuration 68 ms.
//!
//! jemalloc's thread caches hold only allocations up to 32 KiB by default; every larger one went
//! through the arena, and a BERT pass (dozens of activations of 0.1–6 MiB) took twice as long
//! as under glibc, a fifth of its profile page faults and `madvise` (MiniLM 1×128: 32 ms against
//! 16 ms). `tcache_max:8388608` (jemalloc's largest) caches them per thread: 17–18 ms, and
//! EfficientNet-Lite0 unchanged (`scripts/bench.sh embed onnx`).
//!
//! A library does not choose its embedder's allocator: each binary opts in with
//! [`global_allocator!`](crate::global_allocator).

#[cfg(not(target_env = "msvc"))]
pub use tikv_jemallocator::Jemalloc;

/// jemalloc's run-time options as a C string (`global_allocator!` exports a pointer to it as
/// `malloc_conf`, which jemalloc reads at its first allocation). `MALLOC_CONF` in the environment
/// (spelled `_RJEM_MALLOC_CONF`) still overrides it.
pub const MALLOC_CONF: [u8; 63] = *b"oversize_threshold:0,background_thread:true,tcache_max:8388608\0";

/// Makes jemalloc, configured by [`MALLOC_CONF`], the allocator of the binary that invokes it (at
/// the top level of its crate root). No-op on MSVC targets, where jemalloc does not build.
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[cfg(not(target_env = "msvc"))]
        #[global_allocator]
        static ALLOCATOR: $crate::alloc::Jemalloc = $crate::alloc::Jemalloc;

        /// jemalloc's `const char *malloc_conf` (prefixed by tikv-jemalloc-sys).
        #[cfg(not(target_env = "msvc"))]
        // SAFETY: jemalloc declares this symbol as a weak `const char *` and reads it once, as a
        // NUL-terminated string; `&[u8; N]` is a thin pointer, to a static that ends in NUL
        // (`MALLOC_CONF`'s last byte), and no other item in the binary exports this name.
        #[unsafe(export_name = "_rjem_malloc_conf")]
        static MALLOC_CONF: &[u8; 63] = &$crate::alloc::MALLOC_CONF;
    };
}

#[cfg(test)]
mod tests {
    use super::MALLOC_CONF;

    #[test]
    fn the_configuration_is_one_c_string() {
        let (last, body) = MALLOC_CONF.split_last().expect("not empty");
        assert_eq!(*last, 0, "jemalloc reads a NUL-terminated string");
        assert!(!body.contains(&0), "a NUL inside would cut the options short");
        let text = std::str::from_utf8(body).expect("ASCII");
        assert!(text.split(',').all(|o| o.split_once(':').is_some_and(|(k, v)| !k.is_empty() && !v.is_empty())));
    }
}
