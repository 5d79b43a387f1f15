//! Test guest for `eir:plugin/llm`: input `prompt` (BYTES `[1]`, a user message); parameters
//! `model` (default `smollm2`), `max_tokens` (default 16), `temperature` (default 0: greedy),
//! `seed`, `drop_after` (stop reading after this many chunks and drop the generation).
//! Outputs `text` (BYTES `[1]`), `tokens` (INT64), `chunks` (INT64 `[1]`, how many chunks came)
//! and `finish` (BYTES `[1]`: reason, prompt tokens, completion tokens).

use eir_guest::llm::{self, Model, Options};
use eir_guest::{Plugin, Request, Response, Result, Tensor};

struct LlmChat;

impl Plugin for LlmChat {
    fn handle(request: Request) -> Result<Response> {
        let prompt = request.texts("prompt")?;
        let model_name: String = request.param_or("model", "smollm2".to_string())?;
        let max_tokens: u32 = request.param_or("max_tokens", 16)?;
        let temperature: f32 = request.param_or("temperature", 0.0)?;
        let seed: u64 = request.param_or("seed", 1)?;
        let drop_after: usize = request.param_or("drop_after", usize::MAX)?;
        let model = Model::open(&model_name)?;
        let ids = model.chat_prompt(&[llm::user(prompt.first().copied().unwrap_or_default())])?;
        let options = if temperature > 0.0 {
            Options::sampled(temperature, max_tokens, Some(seed))
        } else {
            Options::greedy(max_tokens)
        };
        let generation = model.generate(&ids, &options)?;
        let (mut text, mut tokens, mut chunks) = (String::new(), Vec::<i64>::new(), 0i64);
        while let Some(chunk) = generation.next() {
            text.push_str(&chunk.text);
            tokens.extend(chunk.tokens.iter().map(|&t| i64::from(t)));
            chunks += 1;
            if chunks as usize >= drop_after {
                break;
            }
        }
        let finish = generation.finished().map_or_else(|| "running".to_string(), |f| f.summary());
        let n = tokens.len() as u64;
        Ok(Response::new()
            .with(Tensor::strings("text", [text]))
            .with(Tensor::new("tokens", vec![n], tokens)?)
            .with(Tensor::new("chunks", vec![1], vec![chunks])?)
            .with(Tensor::strings("finish", [finish])))
    }
}

eir_guest::export_plugin!(LlmChat);
