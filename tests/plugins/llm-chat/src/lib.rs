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
//!
//! With parameter `via` = `wasi-nn` it drives the model through the standard wasi:nn WIT
//! instead (EIR's convention: `prompt` and `options` in, `text` and `metadata` out): `prompt`
//! is then the whole prompt in the model's chat format, `stream` = `true` streams by repeated
//! `compute`. Outputs `text`, `chunks` and `metadata` (the last metadata JSON).

use eir_guest::llm::{self, Model, Options};
use eir_guest::{Error, Plugin, Request, Response, Result, Tensor, reply};

struct LlmChat;

impl Plugin for LlmChat {
    fn handle(request: Request) -> Result<Response> {
        if request.param("via") == Some("wasi-nn") {
            return through_wasi_nn(&request);
        }
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

/// The same generation through `wasi:nn/inference`.
fn through_wasi_nn(request: &Request) -> Result<Response> {
    use eir_guest::nn::{Graph, output};
    let model_name: String = request.param_or("model", "smollm2".to_string())?;
    let max_tokens: u32 = request.param_or("max_tokens", 16)?;
    let stream: bool = request.param_or("stream", false)?;
    let prompt = request.texts("prompt")?.first().copied().unwrap_or_default().to_string();
    let options = format!(r#"{{"n-predict": {max_tokens}, "temp": 0, "stream": {stream}}}"#);
    let bytes = |name: &str, s: &str| Tensor::new(name, vec![s.len() as u64], s.as_bytes().to_vec());
    let session = Graph::load_by_name(&model_name)?.session()?;
    let (mut text, mut chunks, mut inputs) =
        (String::new(), 0i64, vec![bytes("prompt", &prompt)?, bytes("options", &options)?]);
    let metadata = loop {
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let outputs = session.compute(&refs)?;
        inputs.clear();
        let piece = output(&outputs, "text")?.values::<u8>()?.to_vec();
        let metadata = String::from_utf8_lossy(output(&outputs, "metadata")?.values::<u8>()?).into_owned();
        text.push_str(&String::from_utf8_lossy(&piece));
        chunks += 1;
        // Streamed, the end is an empty piece with `finish` set; otherwise one compute.
        if !stream || metadata.contains(r#""finish":""#) || chunks > 10_000 {
            break metadata;
        }
    };
    Ok(Response::new()
        .with(Tensor::strings("text", [text]))
        .with(Tensor::new("chunks", vec![1], vec![chunks])?)
        .with(Tensor::strings("metadata", [metadata])))
}

eir_guest::export_plugin!(LlmChat);
