//! Choosing the next token from logits: repeat penalty, then top-k, top-p and min-p on the
//! untempered distribution, then temperature (llama.cpp's default order), with a seeded
//! ChaCha stream so the same seed gives the same text.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use super::LlmError;
use crate::nn::backends::gguf::tokenizer::Token;

/// How to sample, as the OpenAI API, WasmEdge's options and the WIT interface spell it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep the `k` most likely tokens (0: all).
    pub top_k: u32,
    /// Keep the most likely tokens whose probabilities sum to `p` (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens by this (1: off).
    pub repeat_penalty: f32,
    /// How many recent tokens (prompt included) the penalty looks at.
    pub repeat_last_n: u32,
    /// Seed of the random stream; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

impl Sampling {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Checks every value's range; the message names the parameter.
    pub fn validate(&self) -> Result<(), LlmError> {
        let bad = |what: &str| Err(LlmError::BadParameter(what.to_string()));
        if !(0.0..=100.0).contains(&self.temperature) {
            return bad("temperature must be between 0 and 100");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty <= 10.0) {
            return bad("repeat_penalty must be in (0, 10]");
        }
        Ok(())
    }
}

/// A sampler for one sequence.
pub struct Sampler {
    params: Sampling,
    rng: ChaCha8Rng,
    /// Scratch: candidate (token, logit) pairs.
    candidates: Vec<(Token, f32)>,
}

impl Sampler {
    /// A sampler with `params` (checked by the caller with [`Sampling::validate`]).
    pub fn new(params: Sampling) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).map(|_| u64::from_le_bytes(b)).unwrap_or(0x5eed)
        });
        Sampler { params, rng: ChaCha8Rng::seed_from_u64(seed), candidates: Vec::new() }
    }

    /// Picks the next token from `logits`, given the tokens so far (`history`, for the penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[Token]) -> Token {
        let p = &self.params;
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as Token, if l.is_nan() { f32::MIN } else { l })));
        if p.repeat_penalty != 1.0 {
            let recent = &history[history.len().saturating_sub(p.repeat_last_n as usize)..];
            let mut seen: Vec<Token> = recent.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(c) = self.candidates.get_mut(t as usize) {
                    c.1 = if c.1 > 0.0 { c.1 / p.repeat_penalty } else { c.1 * p.repeat_penalty };
                }
            }
        }
        if p.temperature <= 0.0 {
            // Ties go to the lowest id, as llama.cpp's greedy sampler does.
            return self
                .candidates
                .iter()
                .fold((0, f32::NEG_INFINITY), |b, &(t, l)| if l > b.1 { (t, l) } else { b })
                .0;
        }
        // Most likely first (ties by id, so results do not depend on sort stability).
        let k = if p.top_k == 0 { self.candidates.len() } else { (p.top_k as usize).min(self.candidates.len()) };
        let by_logit = |a: &(Token, f32), b: &(Token, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k, by_logit);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit);
        // Probabilities before temperature, for top-p and min-p.
        let max = self.candidates[0].1;
        let weights: Vec<f64> = self.candidates.iter().map(|c| f64::from(c.1 - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut keep = self.candidates.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, w) in weights.iter().enumerate() {
                acc += w / total;
                if acc >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            // weights[0] is the most likely token's (exp(0) = 1).
            keep = keep.min(weights.iter().take_while(|&&w| w >= f64::from(p.min_p)).count().max(1));
        }
        self.candidates.truncate(keep);
        let t = f64::from(p.temperature);
        let tempered: Vec<f64> = self.candidates.iter().map(|c| (f64::from(c.1 - max) / t).exp()).collect();
        let sum: f64 = tempered.iter().sum();
        // A uniform draw in [0, 1) from 53 random bits.
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * sum;
        let mut acc = 0.0;
        for (c, w) in self.candidates.iter().zip(&tempered) {
            acc += w;
            if u < acc {
                return c.0;
            }
        }
        self.candidates.last().map_or(0, |c| c.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_the_penalty_can_change_it() {
        let logits = [0.1, 2.0, 1.9, -3.0];
        assert_eq!(Sampler::new(Sampling::greedy()).sample(&logits, &[]), 1);
        let penalised = Sampling { repeat_penalty: 1.1, ..Sampling::greedy() };
        assert_eq!(Sampler::new(penalised).sample(&logits, &[1, 1, 3]), 2);
    }

    #[test]
    fn same_seed_same_tokens_and_truncation_holds() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = Sampling { temperature: 1.0, top_k: 5, top_p: 1.0, min_p: 0.0, seed: Some(42), ..Sampling::default() };
        let draw = |p: &Sampling| {
            let mut s = Sampler::new(p.clone());
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        assert_ne!(a, draw(&Sampling { seed: Some(43), ..p.clone() }));
        // Only the top 5 ever come out, and more than one of them does.
        let mut top: Vec<usize> = (0..100).collect();
        top.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
        assert!(a.iter().all(|t| top[..5].contains(&(*t as usize))));
        assert!(a.iter().any(|&t| t != a[0]));
        // min-p 1.0 keeps only the most likely token.
        let only = Sampling { min_p: 1.0, top_k: 0, ..p.clone() };
        assert!(draw(&only).iter().all(|&t| t as usize == top[0]));
        // A tiny top-p keeps only the most likely token too.
        let only = Sampling { top_p: 1e-6, top_k: 0, ..p };
        assert!(draw(&only).iter().all(|&t| t as usize == top[0]));
    }

    #[test]
    fn bad_parameters_are_named() {
        for (p, name) in [
            (Sampling { temperature: -1.0, ..Sampling::default() }, "temperature"),
            (Sampling { top_p: 0.0, ..Sampling::default() }, "top_p"),
            (Sampling { min_p: 2.0, ..Sampling::default() }, "min_p"),
            (Sampling { repeat_penalty: 0.0, ..Sampling::default() }, "repeat_penalty"),
            (Sampling { temperature: f32::NAN, ..Sampling::default() }, "temperature"),
        ] {
            assert!(p.validate().unwrap_err().to_string().contains(name), "{name}");
        }
    }
}
