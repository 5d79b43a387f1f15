//! Test guest for `eir:plugin/llm` and `eir:plugin/reply`.
//!
//! Input `prompt` (BYTES `[1]`, a user message), or a chat as `/v1/chat/completions` sends it
//! (`role`/`content`; with parameter `raw` = `true` the last message's text is continued as
//! plain text, without the chat template). Parameters `model` (default `smollm2`), the
//! generation parameters of `eir_guest::llm::options_from` (default greedy, 16 tokens), and
//! `drop_after` (stop reading after this many chunks and drop the generation). Each chunk is
//! streamed to a caller that reads a stream. Outputs `answer`/`text` (BYTES `[1]`), `tokens`
//! (INT64), `chunks` (INT64 `[1]`, how many chunks came) and `finish` (BYTES `[1]`: reason,
//! prompt tokens, completion tokens), and the chat convention's response parameters.

use eir_guest::llm::{self, Model, Options};
use eir_guest::{Error, Plugin, Request, Response, Result, Tensor, reply};

struct LlmChat;

impl Plugin for LlmChat {
    fn handle(request: Request) -> Result<Response> {
        let model_name: String = request.param_or("model", "smollm2".to_string())?;
        let drop_after: usize = request.param_or("drop_after", usize::MAX)?;
        let model = Model::open(&model_name)?;
        let ids = if request.inputs.iter().any(|t| t.name == "content") {
            let messages = llm::chat_messages(&request)?;
            if request.param("raw") == Some("true") {
                let last = messages.last().ok_or_else(|| Error::invalid_input("no messages"))?;
                model.tokenize(&last.content)?
            } else {
                model.chat_prompt(&messages)?
            }
        } else {
            let prompt = request.texts("prompt")?;
            model.chat_prompt(&[llm::user(prompt.first().copied().unwrap_or_default())])?
        };
        let options = llm::options_from(&request, Options::greedy(16))?;
        let generation = model.generate(&ids, &options)?;
        let streaming = reply::streaming();
        let (mut text, mut tokens, mut chunks) = (String::new(), Vec::<i64>::new(), 0i64);
        while let Some(chunk) = generation.next() {
            if streaming && reply::send(&chunk.text).is_err() {
                return Err(Error::internal("the caller went away"));
            }
            text.push_str(&chunk.text);
            tokens.extend(chunk.tokens.iter().map(|&t| i64::from(t)));
            chunks += 1;
            if chunks as usize >= drop_after {
                break;
            }
        }
        let finished = generation.finished();
        let finish = finished.as_ref().map_or_else(|| "running".to_string(), |f| f.summary());
        let n = tokens.len() as u64;
        let response = Response::new()
            .with(Tensor::strings("answer", [text.clone()]))
            .with(Tensor::strings("text", [text]))
            .with(Tensor::new("tokens", vec![n], tokens)?)
            .with(Tensor::new("chunks", vec![1], vec![chunks])?)
            .with(Tensor::strings("finish", [finish]));
        Ok(match &finished {
            Some(f) => response.with_finished(f),
            None => response,
        })
    }
}

eir_guest::export_plugin!(LlmChat);
