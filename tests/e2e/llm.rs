//! SmolLM2 (GGUF, Q4_1) on EIR's own llama forward and quantized kernels, against llama.cpp
//! (`tests/fixtures/smollm2/`, made by `make_smollm2_reference.mjs` with node-llama-cpp 3.21.1 on
//! the same file).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use eir::llm::{ChatTemplate, Engine, Event, Finish, GenerateRequest, Message, Sampling, Settings};
use eir::nn::Meter;
use eir::nn::backends::gguf::GgufModel;
use eir::nn::backends::gguf::llama::Step;
use eir::scheduler::Tenant;
use serde::Deserialize;

use crate::common::repo;

/// The fetched GGUF; a missing model fails with the command that fetches it.
pub fn smollm2_file() -> PathBuf {
    let dir = std::env::var_os("EIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("models"));
    eir::registry::fetch::locate("smollm2", &dir)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The model, loaded once for all tests here.
pub fn smollm2() -> &'static Arc<GgufModel> {
    static MODEL: OnceLock<Arc<GgufModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let bytes = std::fs::read(smollm2_file()).expect("reading the GGUF");
        Arc::new(GgufModel::from_bytes(&bytes, &Meter::with_budget(1 << 30)).expect("loading SmolLM2"))
    })
}

#[derive(Deserialize)]
struct Tokens {
    plain: Vec<Tokenized>,
    special: Vec<Tokenized>,
}

#[derive(Deserialize)]
struct Tokenized {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Greedy {
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    messages: Vec<Message>,
    text: String,
    ids: Vec<u32>,
    greedy: Vec<u32>,
    greedy_text: String,
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(repo().join("tests/fixtures/smollm2").join(name)).expect("reading a smollm2 fixture")
}

#[test]
fn tokenizer_matches_llama_cpp_on_varied_strings() {
    let tok = &smollm2().tokenizer;
    let fx: Tokens = serde_json::from_str(&fixture("tokens.json")).unwrap();
    assert!(fx.plain.len() >= 30);
    let mut wrong = Vec::new();
    for case in &fx.plain {
        let got = tok.encode(&case.text, false).unwrap();
        if got != case.ids {
            wrong.push(format!("{:?}: got {got:?}, llama.cpp {:?}", case.text, case.ids));
        }
        // Decoding gives the text back (byte-level BPE is lossless).
        assert_eq!(tok.decode(&got), case.text);
    }
    for case in &fx.special {
        let got = tok.encode(&case.text, true).unwrap();
        if got != case.ids {
            wrong.push(format!("{:?} (special): got {got:?}, llama.cpp {:?}", case.text, case.ids));
        }
        // Without special parsing, control-token text stays plain text.
        let plain = tok.encode(&case.text, false).unwrap();
        assert!(!plain.iter().any(|&t| t <= 16), "{:?} forged a control token: {plain:?}", case.text);
    }
    assert!(
        wrong.is_empty(),
        "{} of {} strings differ:\n{}",
        wrong.len(),
        fx.plain.len() + fx.special.len(),
        wrong.join("\n")
    );
}

/// Greedy decoding of `prompt` for up to `max` tokens, one sequence.
fn greedy(model: &GgufModel, prompt: &[u32], max: usize) -> (Vec<u32>, Vec<f32>) {
    let meter = Meter::with_budget(1 << 30);
    let mut cache = model.llama.cache(prompt.len() + max).unwrap();
    let mut logits =
        model.llama.forward(&mut [Step { cache: &mut cache, tokens: prompt, logits: true }], &meter).unwrap()[0]
            .take()
            .unwrap();
    let first = logits.clone();
    let mut out = Vec::new();
    while out.len() < max {
        let next = argmax(&logits);
        out.push(next);
        if model.tokenizer.ends_turn(next) {
            break;
        }
        logits = model.llama.forward(&mut [Step { cache: &mut cache, tokens: &[next], logits: true }], &meter).unwrap()
            [0]
        .take()
        .unwrap();
    }
    (out, first)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0
        as u32
}

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let max = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    v.iter().map(|&x| x as f64 - lse).collect()
}

/// The prompts' ids, the first 16 greedy tokens and the next-token distribution, against
/// llama.cpp on the same file (flash attention off, prompt in one batch; the fixture keeps only
/// prompts whose greedy answer llama.cpp gives alike in three of its configurations, see
/// `make_smollm2_reference.mjs`).
///
/// Tolerance: llama.cpp compared with itself (flash attention on vs off, prompt in one batch vs
/// token by token) gives on these 5 prompts a cosine of the centred log-probabilities of
/// 0.9990-0.9996 and a KL divergence of 0.002-0.014 nats. Its K/V cache and attention products
/// are f16, EIR's f32, and both quantize activations to 8 bits per block, which turns any
/// difference in the last bits of an activation into a whole quantization step. EIR must stay
/// within that spread: cosine >= 0.998 and KL <= 0.015 (measured: 0.9987-0.9995, 0.005-0.0095).
#[test]
fn greedy_generation_and_logits_match_llama_cpp() {
    let model = smollm2();
    let fx: Greedy = serde_json::from_str(&fixture("greedy.json")).unwrap();
    let reference = std::fs::read(repo().join("tests/fixtures/smollm2/logprobs.f32")).unwrap();
    let vocab = model.llama.config.vocab;
    assert_eq!(fx.prompts.len(), 5);
    assert_eq!(reference.len(), fx.prompts.len() * vocab * 4);
    for (i, p) in fx.prompts.iter().enumerate() {
        assert_eq!(model.tokenizer.encode(&p.text, true).unwrap(), p.ids, "prompt {i} ids");
        let (tokens, logits) = greedy(model, &p.ids, 16);
        let ours = log_softmax(&logits);
        let theirs: Vec<f64> = reference[i * vocab * 4..(i + 1) * vocab * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect();
        // Tokens llama.cpp gave probability 0 (underflow) are left out of the comparison.
        let pairs: Vec<(f64, f64)> =
            ours.iter().zip(&theirs).filter(|(_, t)| t.is_finite()).map(|(&a, &b)| (a, b)).collect();
        assert!(pairs.len() > vocab * 9 / 10, "prompt {i}: only {} finite reference log-probs", pairs.len());
        let mean = |f: &dyn Fn(&(f64, f64)) -> f64| pairs.iter().map(f).sum::<f64>() / pairs.len() as f64;
        let (ma, mb) = (mean(&|p| p.0), mean(&|p| p.1));
        let dot: f64 = pairs.iter().map(|(a, b)| (a - ma) * (b - mb)).sum();
        let na: f64 = pairs.iter().map(|(a, _)| (a - ma).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = pairs.iter().map(|(_, b)| (b - mb).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / (na * nb);
        // KL(llama.cpp || EIR).
        let kl: f64 = pairs.iter().map(|(a, b)| b.exp() * (b - a)).sum();
        eprintln!("prompt {i}: cosine {cosine:.6}, KL {kl:.6}");
        assert_eq!(
            tokens,
            p.greedy,
            "prompt {i}: EIR {:?} vs llama.cpp {:?}",
            model.tokenizer.decode(&tokens),
            p.greedy_text
        );
        assert!(cosine >= 0.998, "prompt {i}: cosine {cosine}");
        assert!(kl <= 0.015, "prompt {i}: KL {kl}");
    }
}

#[test]
fn the_chat_template_renders_as_the_reference_prompts() {
    let model = smollm2();
    let source = model.chat_template.as_deref().expect("SmolLM2 carries a chat template");
    let t = ChatTemplate::new(source, "<|im_start|>", "<|im_end|>").unwrap();
    let fx: Greedy = serde_json::from_str(&fixture("greedy.json")).unwrap();
    for p in &fx.prompts {
        assert_eq!(t.render(&p.messages, true).unwrap(), p.text);
    }
}

/// Runs `prompt` to the end on `engine`, returning its tokens and finish reason.
fn collect(engine: &Engine, prompt: Vec<u32>, max_tokens: usize, tenant: &Arc<Tenant>) -> (Vec<u32>, Finish) {
    let req = GenerateRequest {
        prompt,
        sampling: Sampling::greedy(),
        max_tokens,
        stop: vec![],
        tenant: tenant.clone(),
        deadline: None,
    };
    let mut g = engine.submit(req).expect("submitted");
    let mut tokens = Vec::new();
    while let Some(ev) = g.blocking_next() {
        match ev {
            Event::Chunk { tokens: t, .. } => tokens.extend(t),
            Event::Done { finish, error, .. } => {
                assert!(error.is_none(), "{error:?}");
                return (tokens, finish);
            }
        }
    }
    panic!("the generation ended without Done");
}

/// Continuous batching must not change answers, nor let sequences see each other: 8
/// concurrent greedy streams (from 4 tenants) each equal their single-stream run.
#[test]
fn eight_concurrent_streams_each_match_their_single_stream_run() {
    let model = smollm2();
    let engine = Engine::new(model.clone(), Settings { prefill_chunk: 64, ..Settings::default() }).unwrap();
    let tenants: Vec<Arc<Tenant>> = (0..4).map(|i| Arc::new(Tenant::new(&format!("t{i}")))).collect();
    let questions = [
        "What is the capital of France?",
        "Write a haiku about edge computing.",
        "List three prime numbers greater than 100.",
        "What does CPU stand for?",
        "Give me a short tip for writing clean code.",
        "How many legs does a spider have?",
        "Summarize the water cycle in two sentences.",
        "Name a famous painting by Leonardo da Vinci.",
    ];
    let t = ChatTemplate::new(model.chat_template.as_deref().unwrap(), "<|im_start|>", "<|im_end|>").unwrap();
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            let text = t.render(&[Message { role: "user".into(), content: q.to_string() }], true).unwrap();
            model.tokenizer.encode(&text, true).unwrap()
        })
        .collect();
    let alone: Vec<(Vec<u32>, Finish)> =
        prompts.iter().enumerate().map(|(i, p)| collect(&engine, p.clone(), 24, &tenants[i % 4])).collect();
    let before = engine.stats();
    let together: Vec<(Vec<u32>, Finish)> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (engine, tenant) = (&engine, &tenants[i % 4]);
                s.spawn(move || collect(engine, p.clone(), 24, tenant))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let after = engine.stats();
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a,
            b,
            "stream {i}: alone {:?}, batched {:?}",
            model.tokenizer.decode(&a.0),
            model.tokenizer.decode(&b.0)
        );
        assert!(!a.0.is_empty());
    }
    let (steps, rows) = (after.steps - before.steps, after.batched - before.batched);
    eprintln!("8 streams: {steps} steps, {:.2} sequences per step", rows as f64 / steps as f64);
    assert!(rows as f64 / steps as f64 > 4.0, "the streams ran batched: {rows} rows in {steps} steps");
    assert!(tenants.iter().all(|t| t.used_seconds() > 0.0), "every tenant was charged");
    assert_eq!((after.active, after.kv_bytes), (0, 0));
}

/// A dropped generation leaves the batch and frees its KV cache within a step.
#[test]
fn dropping_a_generation_frees_its_slot() {
    let model = smollm2();
    let engine = Engine::new(model.clone(), Settings::default()).unwrap();
    let tenant = Arc::new(Tenant::new("a"));
    let prompt = model.tokenizer.encode("Once upon a time", false).unwrap();
    let req = GenerateRequest {
        prompt,
        sampling: Sampling { seed: Some(1), ..Sampling::default() },
        max_tokens: 1000,
        stop: vec![],
        tenant,
        deadline: None,
    };
    let mut g = engine.submit(req).unwrap();
    assert!(matches!(g.blocking_next(), Some(Event::Chunk { .. })));
    assert!(engine.stats().kv_bytes > 0);
    drop(g);
    let t = Instant::now();
    while engine.stats().active > 0 || engine.stats().kv_bytes > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "still held: {:?}", engine.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
}
