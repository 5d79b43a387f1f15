//! A tiny llama written as GGUF in memory: batching isolation, chunked prefill and hostile files.

use super::file::{Value, write};
use super::llama::{Llama, Step};
use crate::nn::meter::Meter;

const DIM: u64 = 64;
const KV: u64 = 32;
const FFN: u64 = 96;
const VOCAB: u64 = 40;

struct Rng(u64);
impl Rng {
    fn byte(&mut self) -> u8 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 56) as u8
    }
}

/// Q4_1 blocks with small scales, random nibbles.
fn q4_1(rows: u64, cols: u64, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rows * cols / 32 {
        out.extend_from_slice(&half::f16::from_f32(0.02).to_bits().to_le_bytes());
        out.extend_from_slice(&half::f16::from_f32(-0.15).to_bits().to_le_bytes());
        out.extend((0..16).map(|_| rng.byte()));
    }
    out
}

fn q8_0(rows: u64, cols: u64, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rows * cols / 32 {
        out.extend_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
        out.extend((0..32).map(|_| rng.byte() >> 1));
    }
    out
}

fn ones(n: u64) -> Vec<u8> {
    (0..n).flat_map(|_| 1f32.to_le_bytes()).collect()
}

/// A 2-layer llama: 4 heads of 16, 2 KV heads, vocabulary of 40.
fn tiny(edit: impl FnOnce(&mut Vec<(String, Value)>)) -> Vec<u8> {
    let mut rng = Rng(7);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str("llama".into())),
        ("llama.block_count".into(), Value::U64(2)),
        ("llama.embedding_length".into(), Value::U64(DIM)),
        ("llama.feed_forward_length".into(), Value::U64(FFN)),
        ("llama.attention.head_count".into(), Value::U64(4)),
        ("llama.attention.head_count_kv".into(), Value::U64(2)),
        ("llama.rope.freq_base".into(), Value::F64(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F64(1e-5)),
        ("llama.context_length".into(), Value::U64(64)),
        ("tokenizer.ggml.tokens".into(), Value::Array((0..VOCAB).map(|i| Value::Str(format!("t{i}"))).collect())),
    ];
    edit(&mut meta);
    let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    for l in 0..2 {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        tensors.push((n("attn_norm"), vec![DIM], 0, ones(DIM)));
        tensors.push((n("attn_q"), vec![DIM, DIM], 3, q4_1(DIM, DIM, &mut rng)));
        tensors.push((n("attn_k"), vec![DIM, KV], 3, q4_1(KV, DIM, &mut rng)));
        tensors.push((n("attn_v"), vec![DIM, KV], 3, q4_1(KV, DIM, &mut rng)));
        tensors.push((n("attn_output"), vec![DIM, DIM], 3, q4_1(DIM, DIM, &mut rng)));
        tensors.push((n("ffn_norm"), vec![DIM], 0, ones(DIM)));
        tensors.push((n("ffn_gate"), vec![DIM, FFN], 3, q4_1(FFN, DIM, &mut rng)));
        tensors.push((n("ffn_up"), vec![DIM, FFN], 3, q4_1(FFN, DIM, &mut rng)));
        tensors.push((n("ffn_down"), vec![FFN, DIM], 8, q8_0(DIM, FFN, &mut rng)));
    }
    tensors.push(("token_embd.weight".into(), vec![DIM, VOCAB], 8, q8_0(VOCAB, DIM, &mut rng)));
    tensors.push(("output_norm.weight".into(), vec![DIM], 0, ones(DIM)));
    let meta: Vec<(&str, Value)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let tensors: Vec<(&str, &[u64], u32, &[u8])> =
        tensors.iter().map(|(n, d, t, b)| (n.as_str(), d.as_slice(), *t, b.as_slice())).collect();
    write(&meta, &tensors)
}

fn load(bytes: &[u8]) -> Result<Llama, crate::nn::NnError> {
    Llama::from_gguf(&super::file::Gguf::parse(bytes)?, &Meter::with_budget(1 << 30))
}

fn meter() -> Meter {
    Meter::with_budget(1 << 28)
}

/// Logits after each prefix of `tokens`, one token per step.
fn one_by_one(m: &Llama, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = m.cache(32).unwrap();
    tokens
        .iter()
        .map(|t| {
            m.forward(&mut [Step { cache: &mut cache, tokens: &[*t], logits: true }], &meter()).unwrap()[0]
                .take()
                .unwrap()
        })
        .collect()
}

#[test]
fn batched_sequences_get_exactly_their_unbatched_logits() {
    let m = load(&tiny(|_| {})).unwrap();
    let (a, b, c) = ([3u32, 9, 27, 1, 5], [7u32, 7, 7], [38u32, 0, 12, 30]);
    let (ra, rb, rc) = (one_by_one(&m, &a), one_by_one(&m, &b), one_by_one(&m, &c));
    // A prefills in one chunk while B and C decode one token per step, all in the same steps.
    let (mut ca, mut cb, mut cc) = (m.cache(32).unwrap(), m.cache(32).unwrap(), m.cache(32).unwrap());
    let out = m
        .forward(
            &mut [
                Step { cache: &mut ca, tokens: &a[..4], logits: true },
                Step { cache: &mut cb, tokens: &b[..1], logits: true },
                Step { cache: &mut cc, tokens: &c[..2], logits: false },
            ],
            &meter(),
        )
        .unwrap();
    assert_eq!(out[0].as_ref().unwrap(), &ra[3]);
    assert_eq!(out[1].as_ref().unwrap(), &rb[0]);
    assert!(out[2].is_none());
    let out = m
        .forward(
            &mut [
                Step { cache: &mut cb, tokens: &b[1..2], logits: true },
                Step { cache: &mut ca, tokens: &a[4..], logits: true },
                Step { cache: &mut cc, tokens: &c[2..], logits: true },
            ],
            &meter(),
        )
        .unwrap();
    // Bit-identical: every row's arithmetic is independent of the other rows in its step.
    assert_eq!(out[0].as_ref().unwrap(), &rb[1]);
    assert_eq!(out[1].as_ref().unwrap(), &ra[4]);
    assert_eq!(out[2].as_ref().unwrap(), &rc[3]);
    assert_eq!((ca.len(), cb.len(), cc.len()), (5, 2, 4));
}

#[test]
fn a_full_context_and_bad_tokens_are_errors_that_leave_the_cache_alone() {
    let m = load(&tiny(|_| {})).unwrap();
    let mut cache = m.cache(4).unwrap();
    m.forward(&mut [Step { cache: &mut cache, tokens: &[1, 2, 3], logits: false }], &meter()).unwrap();
    let err = m.forward(&mut [Step { cache: &mut cache, tokens: &[1, 2], logits: true }], &meter()).unwrap_err();
    assert_eq!(err.code, crate::nn::bindings::errors::ErrorCode::TooLarge);
    let err = m.forward(&mut [Step { cache: &mut cache, tokens: &[40], logits: true }], &meter()).unwrap_err();
    assert_eq!(err.code, crate::nn::bindings::errors::ErrorCode::InvalidArgument);
    assert_eq!(cache.len(), 3);
    assert!(m.cache(65).is_err(), "beyond the model's context");
    // A cancelled step stops and leaves the cache as it was.
    let token = crate::nn::CancelToken::new();
    token.cancel();
    let cancelled = Meter::new(1 << 28, token, None);
    assert!(m.forward(&mut [Step { cache: &mut cache, tokens: &[5], logits: true }], &cancelled).is_err());
    assert_eq!(cache.len(), 3);
    // Over the activation budget: too-large, nothing run.
    let small = Meter::with_budget(1024);
    let err = m.forward(&mut [Step { cache: &mut cache, tokens: &[5], logits: true }], &small).unwrap_err();
    assert_eq!(err.code, crate::nn::bindings::errors::ErrorCode::TooLarge);
}

#[test]
fn inconsistent_models_are_refused_with_the_reason() {
    type Edit = Box<dyn Fn(&mut Vec<(String, Value)>)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|m| m[4].1 = Value::U64(5)), "heads"),
        (Box::new(|m| m[5].1 = Value::U64(3)), "heads"),
        (Box::new(|m| m[2].1 = Value::U64(96)), "expected"),
        (Box::new(|m| m[0].1 = Value::Str("gpt9".into())), "gpt9"),
        (Box::new(|m| m[1].1 = Value::U64(3)), "blk.2"),
        (Box::new(|m| m[9].1 = Value::Array(vec![Value::Str("x".into())])), "token_embd"),
        (Box::new(|m| m[7].1 = Value::F64(-1.0)), "epsilon"),
        (Box::new(|m| m[5].1 = Value::U64(0)), "head_count_kv"),
    ];
    for (edit, want) in cases {
        let err = load(&tiny(edit)).err().expect("refused");
        assert!(err.message.contains(want), "{want}: {err}");
    }
    // The same file cut anywhere is an error, never a panic.
    let bytes = tiny(|_| {});
    for cut in (0..bytes.len()).step_by(97) {
        assert!(load(&bytes[..cut]).is_err());
    }
}
