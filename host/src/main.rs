//! The `eir` binary; everything lives in the library's `cli` module.

// jemalloc, configured to keep freed pages for the next pass (see `eir::alloc`).
eir::global_allocator!();

fn main() -> std::process::ExitCode {
    // candle runs its element-wise kernels on a spinning thread pool of its own beside rayon's
    // (which the scheduler and the matrix kernels share). Two pools on the same cores
    // oversubscribe them and spin: measured on 2 cores, text-embed at 32 connections served
    // 197 req/s with it and 265 without. One pool, unless the operator says otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: nothing else runs yet (this is the first statement of `main`, before any
        // thread is started), so no other thread can read the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    eir::cli::main()
}
