//! A program written for WasmEdge's GGML (llama.cpp) backend, in the style of its
//! `wasmedge-ggml/llama` and `llama-stream` examples: built for `wasm32-wasip1` with the
//! `wasmedge-wasi-nn` crate, it loads a model by name with options as JSON, sets the prompt (in
//! the model's chat format) at input 0, and either computes the whole answer or streams it token
//! by token with `compute_single` until the model ends its turn.
//!
//! `wasmedge-ggml MODE MODEL CONFIG PROMPT [MAX]`: MODE is `compute` or `stream` (at most MAX
//! tokens, then `fini_single`). Prints one JSON object: the text, the pieces (stream), how it
//! ended (`ok` or the error code, e.g. 100 end of sequence, 101 context full, 102 prompt too
//! long, 103 model not found) and the metadata JSON of output 1.

use serde_json::{Value, json};
use wasmedge_wasi_nn::{BackendError, Error, ExecutionTarget, GraphBuilder, GraphEncoding, TensorType};

fn code(e: &Error) -> Value {
    match e {
        Error::BackendError(b) => json!(match b {
            BackendError::InvalidArgument => 1,
            BackendError::InvalidEncoding => 2,
            BackendError::MissingMemory => 3,
            BackendError::Busy => 4,
            BackendError::RuntimeError => 5,
            BackendError::UnsupportedOperation => 6,
            BackendError::TooLarge => 7,
            BackendError::NotFound => 8,
            BackendError::EndOfSequence => 100,
            BackendError::ContextFull => 101,
            BackendError::PromptTooLong => 102,
            BackendError::ModelNotFound => 103,
            BackendError::UnknownError(n) => *n,
        }),
        Error::IoError(e) => json!(e.to_string()),
    }
}

fn metadata(ctx: &wasmedge_wasi_nn::GraphExecutionContext) -> Value {
    let mut buf = vec![0u8; 4096];
    match ctx.get_output(1, &mut buf) {
        Ok(n) => serde_json::from_slice(&buf[..n]).unwrap_or(Value::Null),
        Err(e) => json!({ "error": code(&e) }),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, model, config, prompt, rest @ ..] = args.as_slice() else {
        eprintln!("usage: wasmedge-ggml compute|stream MODEL CONFIG PROMPT [MAX]");
        std::process::exit(2);
    };
    let max: usize = rest.first().and_then(|m| m.parse().ok()).unwrap_or(usize::MAX);
    let graph = match GraphBuilder::new(GraphEncoding::Ggml, ExecutionTarget::AUTO)
        .config(config.clone())
        .build_from_cache(model)
    {
        Ok(g) => g,
        Err(e) => {
            println!("{}", json!({ "load": code(&e) }));
            return;
        }
    };
    let mut ctx = graph.init_execution_context().expect("init_execution_context");
    ctx.set_input(0, TensorType::U8, &[1], prompt.as_bytes()).expect("set_input");
    let mut out = vec![0u8; 1 << 16];
    let report = if mode == "compute" {
        let end = match ctx.compute() {
            Ok(()) => json!("ok"),
            Err(e) => code(&e),
        };
        // As the llama example does, the text is read even after 101 or 102.
        let text = ctx.get_output(0, &mut out).map(|n| String::from_utf8_lossy(&out[..n]).into_owned());
        json!({ "end": end, "text": text.unwrap_or_default(), "metadata": metadata(&ctx) })
    } else {
        let mut pieces = Vec::new();
        let end = loop {
            if pieces.len() >= max {
                break json!("ok");
            }
            match ctx.compute_single() {
                Ok(()) => {
                    let n = ctx.get_output_single(0, &mut out).expect("get_output_single");
                    pieces.push(String::from_utf8_lossy(&out[..n]).into_owned());
                }
                Err(e) => break code(&e),
            }
        };
        let meta = metadata(&ctx);
        ctx.fini_single().expect("fini_single");
        let after = metadata(&ctx);
        json!({ "end": end, "text": pieces.concat(), "pieces": pieces.len(), "metadata": meta,
                "after_fini": after })
    };
    println!("{report}");
    graph.unload().expect("unload");
}
