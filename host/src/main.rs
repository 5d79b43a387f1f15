//! The `eir` binary; everything lives in the library's `cli` module.

// jemalloc, configured to keep freed pages for the next pass (see `eir::alloc`).
eir::global_allocator!();

fn main() -> std::process::ExitCode {
    // SAFETY: the first statement of `main`: no other thread is started yet.
    unsafe { eir::scheduler::one_compute_pool() };
    eir::cli::main()
}
