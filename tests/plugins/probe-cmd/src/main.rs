//! A plain WASI command for testing `eir run` on commands (no EIR-specific imports at all).
//!
//! `probe-cmd args` prints its arguments; `env NAME` prints a variable; `cat PATH` prints a
//! file; `exit N` exits with N; `loop` never ends; `stderr TEXT` writes to stderr.

use std::io::Read;

wit_bindgen::generate!({ world: "probe", generate_all });

/// Exits with `code`; std's `process::exit` can only say success or failure on WASI 0.2.
fn exit(code: u8) -> ! {
    wasi::cli::exit::exit_with_code(code);
    unreachable!("exit-with-code returned")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("args") => println!("{}", args[2..].join(" ")),
        Some("env") => match std::env::var(args.get(2).map(String::as_str).unwrap_or("")) {
            Ok(v) => println!("{v}"),
            Err(_) => {
                eprintln!("not set");
                exit(4);
            }
        },
        Some("cat") => match std::fs::read_to_string(args.get(2).map(String::as_str).unwrap_or("")) {
            Ok(text) => print!("{text}"),
            Err(e) => {
                eprintln!("cannot read: {e}");
                exit(5);
            }
        },
        Some("stdin") => {
            let mut text = String::new();
            let _ = std::io::stdin().read_to_string(&mut text);
            print!("{}", text.to_uppercase());
        }
        Some("exit") => exit(args.get(2).and_then(|c| c.parse().ok()).unwrap_or(1)),
        Some("stderr") => eprintln!("{}", args[2..].join(" ")),
        Some("loop") => {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        _ => {
            eprintln!("usage: probe-cmd args|env|cat|stdin|exit|stderr|loop ...");
            exit(2);
        }
    }
}
