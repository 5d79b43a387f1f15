//! EIR's LLM engine against llama.cpp (node-llama-cpp 3.21.1's prebuilt CPU binary) on the same
//! GGUF (SmolLM2-135M-Instruct Q4_1), prompts and thread count, in one run:
//! single-stream decode tokens/s and time to first token, prefill of a 200-token prompt, and
//! 8 concurrent greedy streams (aggregate tokens/s, mean time to first token, and whether each
//! stream's tokens equal its single-stream run). Prints EIR / llama.cpp per row.
//!
//! Run: `scripts/bench.sh llm` (needs `eir models fetch smollm2` and
//! `npm i --prefix ~/.cache/eir/tools/node-llama -E node-llama-cpp@3.21.1`; set
//! `EIR_NODE_LLAMA` to another `node_modules` folder holding it).

// The allocator the `eir` binary uses, so passes are measured as served.
eir::global_allocator!();

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use eir::llm::{ChatTemplate, Engine, Event, GenerateRequest, Message, Sampling, Settings};
use eir::nn::Meter;
use eir::nn::backends::gguf::GgufModel;
use eir::scheduler::Tenant;

const DECODE: usize = 128;

struct Run {
    tokens: Vec<u32>,
    ttft: f64,
    decode_tok_s: f64,
    end: f64,
}

/// One greedy generation on `engine`; times from submission.
fn generate(engine: &Engine, prompt: &[u32], max_tokens: usize) -> Run {
    let tenant = Arc::new(Tenant::new("bench"));
    let t0 = Instant::now();
    let req = GenerateRequest {
        prompt: prompt.to_vec(),
        sampling: Sampling::greedy(),
        max_tokens,
        stop: vec![],
        tenant,
        deadline: None,
    };
    let mut g = engine.submit(req).expect("submit");
    let (mut tokens, mut first) = (Vec::new(), None);
    while let Some(ev) = g.blocking_next() {
        match ev {
            Event::Chunk { tokens: t, .. } => {
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                tokens.extend(t);
            }
            Event::Done { .. } => break,
        }
    }
    let end = t0.elapsed().as_secs_f64();
    let ttft = first.unwrap_or(end);
    let decode_tok_s = (tokens.len().saturating_sub(1)) as f64 / (end - ttft).max(1e-9);
    Run { tokens, ttft, decode_tok_s, end }
}

fn main() -> anyhow::Result<()> {
    // As the `eir` binary does: candle's element-wise kernels in the one compute pool.
    // SAFETY: the first statement of `main`: no other thread is started yet.
    unsafe { eir::scheduler::one_compute_pool() };
    let threads = rayon::current_num_threads();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let models = std::env::var_os("EIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("models"));
    let file = eir::registry::fetch::locate("smollm2", &models)?.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let t = Instant::now();
    let model = Arc::new(GgufModel::from_bytes(&std::fs::read(&file)?, &Meter::with_budget(1 << 30))?);
    eprintln!("loaded {} in {:.2} s", file.display(), t.elapsed().as_secs_f64());
    let tok = &model.tokenizer;
    let chat = ChatTemplate::new(model.chat_template.as_deref().unwrap_or_default(), "<|im_start|>", "<|im_end|>")?;
    let ask = |q: &str| -> anyhow::Result<Vec<u32>> {
        let text = chat.render(&[Message { role: "user".into(), content: q.into() }], true)?;
        Ok(tok.encode(&text, true)?)
    };
    // A plain-text story opening: the model continues it well past 128 tokens.
    let story = tok.encode("Once upon a time, in a small village at the edge of a great forest, there lived", false)?;
    let passage = "Edge inference runs models close to where data is produced: on gateways, cameras and \
                   small servers. It saves bandwidth, keeps private data local and answers quickly. ";
    let long: Vec<u32> = tok.encode(&passage.repeat(12), false)?.into_iter().take(200).collect();
    let questions = [
        "Write a short poem about edge computing.",
        "What is the capital of France?",
        "Explain photosynthesis simply.",
        "Give three tips for learning to code.",
        "Describe a sunset over the ocean.",
        "Why is the sky blue?",
        "What makes a good friend?",
        "Tell me a fun fact about octopuses.",
    ];
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| ask(q)).collect::<Result<_, _>>()?;

    let engine = Engine::new(model.clone(), Settings::default())?;
    generate(&engine, &story, 8); // warm up
    let single = generate(&engine, &story, DECODE);
    let prefill = generate(&engine, &long, 1);
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| generate(&engine, p, DECODE).tokens).collect();
    let t0 = Instant::now();
    let together: Vec<Run> = std::thread::scope(|s| {
        let hs: Vec<_> = prompts.iter().map(|p| s.spawn(|| generate(&engine, p, DECODE))).collect();
        hs.into_iter().map(|h| h.join().expect("stream")).collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let total: usize = together.iter().map(|r| r.tokens.len()).sum();
    let identical = together.iter().zip(&alone).filter(|(r, a)| &r.tokens == *a).count();
    let stats = engine.stats();
    let eir_aggregate = total as f64 / wall;
    let eir_ttft8 = together.iter().map(|r| r.ttft).sum::<f64>() / together.len() as f64;
    eprintln!(
        "EIR: {} single-stream tokens, {:.0} tok/s; 8 streams: {total} tokens in {wall:.2} s, mean batch {:.2}, last stream ended at {:.2} s",
        single.tokens.len(),
        single.decode_tok_s,
        stats.batched as f64 / stats.steps.max(1) as f64,
        together.iter().map(|r| r.end).fold(0.0, f64::max)
    );

    // llama.cpp on the same inputs.
    let node_modules = std::env::var_os("EIR_NODE_LLAMA").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/eir/tools/node-llama/node_modules")
    });
    let input = tempfile::NamedTempFile::new()?;
    std::fs::write(
        input.path(),
        serde_json::json!({"chat": story, "long": long, "prompts": prompts, "decode": DECODE, "threads": threads})
            .to_string(),
    )?;
    let out = Command::new("node")
        .env("NODE_PATH", &node_modules)
        .arg(root.join("host/benches/llama_cpp_bench.mjs"))
        .arg(&file)
        .arg(input.path())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "llama.cpp side failed (install it: npm i --prefix ~/.cache/eir/tools/node-llama -E node-llama-cpp@3.21.1): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    println!("LLM: SmolLM2-135M-Instruct Q4_1, {threads} threads, greedy; EIR vs llama.cpp ({})", peer["version"]);
    println!("| row | EIR | llama.cpp | EIR / llama.cpp |");
    println!("|---|---|---|---|");
    let row =
        |name: &str, e: f64, l: f64, unit: &str| println!("| {name} | {e:.1} {unit} | {l:.1} {unit} | {:.2}x |", e / l);
    row("single-stream decode", single.decode_tok_s, f(&peer["decode_tok_s"]), "tok/s");
    row("time to first token (story prompt)", single.ttft * 1e3, f(&peer["ttft_s"]) * 1e3, "ms");
    row("prefill, 200 tokens", long.len() as f64 / prefill.end, f(&peer["prefill_tok_s"]), "tok/s");
    row("8 streams, aggregate", eir_aggregate, f(&peer["concurrent"]["aggregate_tok_s"]), "tok/s");
    row("8 streams, mean time to first token", eir_ttft8 * 1e3, f(&peer["concurrent"]["mean_ttft_s"]) * 1e3, "ms");
    println!(
        "8 streams vs EIR single stream: {:.2}x; identical to their single-stream runs: EIR {identical}/8, llama.cpp {}/8",
        eir_aggregate / single.decode_tok_s,
        peer["concurrent"]["identical_to_single"]
    );
    Ok(())
}
