//! The `eir` binary; everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    eir::cli::main()
}
