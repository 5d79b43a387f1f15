//! Retrieval-augmented answers at the edge: the question is embedded with MiniLM, the `k`
//! closest passages of a granted documents directory are put into the prompt, and a language
//! model (SmolLM2 by default) answers from them through `eir:plugin/llm`.
//!
//! The documents (`.md` and `.txt` files directly in the directory, split into passages at
//! blank lines) are embedded once per instance and kept while the instance is reused.
//!
//! Input `question` (BYTES `[1]`), or a chat as `/v1/chat/completions` sends it (`role` and
//! `content`, BYTES `[n]`: the last message is the question, earlier user and assistant turns
//! are kept as history). Parameters: `docs` (default `/docs`), `k` (default 3), `embedder`
//! (default `minilm`), `model` (default `smollm2`), and the generation parameters of
//! `eir_guest::llm::options_from` (`max_tokens` default 128, `temperature` default 0: greedy).
//! Outputs: `answer` (BYTES `[1]`), `sources` (BYTES `[k]`, `file#passage`), `scores` (FP32
//! `[k]`, cosine), `finish` (BYTES `[1]`: reason, prompt and completion tokens), and the chat
//! convention's response parameters. The answer streams to a caller that reads a stream
//! (`eir:plugin/reply`).

use std::sync::OnceLock;

use eir_guest::llm::{self, Model, Options};
use eir_guest::{Datatype, Error, Metadata, Plugin, Request, Response, Result, Tensor, TensorSpec};
use sentence_embed::{Embedded, embed};

struct RagChat;

/// Most passages an index holds, and most bytes read per document.
const MAX_PASSAGES: usize = 4096;
const MAX_DOC_BYTES: u64 = 1 << 20;
/// Passages are paragraphs, merged up to about this many characters.
const PASSAGE_CHARS: usize = 600;

/// The documents of one directory, embedded.
struct Index {
    docs: String,
    embedder: String,
    /// (source, text) per passage.
    passages: Vec<(String, String)>,
    embedded: Embedded,
}

static INDEX: OnceLock<Index> = OnceLock::new();

fn embed_options(n: usize) -> sentence_embed::Options {
    sentence_embed::Options { max_tokens: 256, batch_size: n.clamp(1, 32), normalize: true, keep_tokens: false }
}

/// Splits the directory's documents into passages, in file-name order.
fn passages(dir: &str) -> Result<Vec<(String, String)>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::invalid_input(format!("cannot read docs `{dir}`: {e} (is the directory granted?)")))?;
    let mut files: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md" || x == "txt"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size > MAX_DOC_BYTES {
            return Err(Error::invalid_input(format!("document `{name}` is over {MAX_DOC_BYTES} bytes")));
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::invalid_input(format!("cannot read `{name}`: {e}")))?;
        let mut current = String::new();
        let mut n = 0;
        for para in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
            if !current.is_empty() && current.len() + para.len() > PASSAGE_CHARS {
                out.push((format!("{name}#{n}"), std::mem::take(&mut current)));
                n += 1;
            }
            if !current.is_empty() {
                current.push('\n');
            }
            current.push_str(para);
        }
        if !current.is_empty() {
            out.push((format!("{name}#{n}"), current));
        }
        if out.len() > MAX_PASSAGES {
            return Err(Error::invalid_input(format!("the documents make over {MAX_PASSAGES} passages")));
        }
    }
    if out.is_empty() {
        return Err(Error::invalid_input(format!("no .md or .txt documents in `{dir}`")));
    }
    Ok(out)
}

fn build(docs: &str, embedder: &str) -> Result<Index> {
    let passages = passages(docs)?;
    let texts: Vec<&str> = passages.iter().map(|(_, t)| t.as_str()).collect();
    let tokenizer = format!("/models/{embedder}/tokenizer.json");
    let embedded = embed(embedder, &tokenizer, &texts, &embed_options(texts.len()))?;
    Ok(Index { docs: docs.to_string(), embedder: embedder.to_string(), passages, embedded })
}

impl Plugin for RagChat {
    fn metadata() -> Metadata {
        Metadata {
            description:
                "Retrieval-augmented answers: MiniLM retrieval over granted documents, a language model's answer".into(),
            inputs: vec![TensorSpec::new("question", Datatype::Bytes, [1])],
            outputs: vec![
                TensorSpec::new("answer", Datatype::Bytes, [1]),
                TensorSpec::new("sources", Datatype::Bytes, [-1]),
                TensorSpec::new("scores", Datatype::Fp32, [-1]),
                TensorSpec::new("finish", Datatype::Bytes, [1]),
            ],
        }
    }

    fn handle(request: Request) -> Result<Response> {
        let (question, history) = question(&request)?;
        let docs: String = request.param_or("docs", "/docs".to_string())?;
        let embedder: String = request.param_or("embedder", "minilm".to_string())?;
        let model_name: String = request.param_or("model", "smollm2".to_string())?;
        let k: usize = request.param_or("k", 3)?;
        let options = llm::options_from(&request, Options::greedy(128))?;
        let max_tokens = options.max_tokens;
        if !(1..=16).contains(&k) {
            return Err(Error::invalid_input("k must be 1 to 16"));
        }

        // The index of this instance's documents (rebuilt, uncached, for other parameters).
        let built;
        let index = match INDEX.get() {
            Some(i) if i.docs == docs && i.embedder == embedder => i,
            Some(_) => {
                built = build(&docs, &embedder)?;
                &built
            }
            None => {
                let fresh = build(&docs, &embedder)?;
                INDEX.get_or_init(|| fresh)
            }
        };
        let q = embed(&embedder, &format!("/models/{embedder}/tokenizer.json"), &[&question], &embed_options(1))?;
        let dim = index.embedded.dim;
        if q.dim != dim {
            return Err(Error::model("the question and documents have different embedding sizes"));
        }
        let mut ranked: Vec<(usize, f32)> = index
            .embedded
            .values
            .chunks_exact(dim.max(1))
            .map(|p| p.iter().zip(&q.values).map(|(a, b)| a * b).sum::<f32>())
            .enumerate()
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(k);

        let model = Model::open(&model_name)?;
        // As many of the best passages as fit the context with the answer.
        let mut used = ranked.len();
        let prompt = loop {
            let context: String = ranked[..used]
                .iter()
                .enumerate()
                .map(|(i, (p, _))| format!("[{}] {}\n", i + 1, index.passages[*p].1))
                .collect();
            let system = format!(
                "Answer the question using only the context below. If the context does not answer it, say you do not know.\n\nContext:\n{context}"
            );
            let mut messages = vec![llm::system(system)];
            messages.extend(history.iter().cloned());
            messages.push(llm::user(question.clone()));
            let ids = model.chat_prompt(&messages)?;
            if ids.len() as u64 + u64::from(max_tokens) <= u64::from(model.context_length()) || used == 0 {
                break ids;
            }
            used -= 1;
        };
        let generation = model.generate(&prompt, &options)?;
        let (answer, finished) = llm::stream_to_caller(&generation);
        let finished = finished.ok_or_else(|| Error::internal("the caller went away"))?;
        let sources: Vec<String> = ranked[..used].iter().map(|(p, _)| index.passages[*p].0.clone()).collect();
        let scores: Vec<f32> = ranked[..used].iter().map(|(_, s)| *s).collect();
        let n = sources.len() as u64;
        Ok(Response::new()
            .with(Tensor::strings("answer", [answer]))
            .with(Tensor::strings("sources", sources))
            .with(Tensor::new("scores", vec![n], scores)?)
            .with(Tensor::strings("finish", [finished.summary()]))
            .with_finished(&finished))
    }
}

/// The question, and the earlier turns of a chat (user and assistant messages; the plugin
/// writes its own system message).
fn question(request: &Request) -> Result<(String, Vec<llm::Message>)> {
    if request.inputs.iter().any(|t| t.name == "content") {
        let mut messages = llm::chat_messages(request)?;
        let last = messages.pop().filter(|m| m.role == "user" && !m.content.trim().is_empty());
        let last = last.ok_or_else(|| Error::invalid_input("the last message must be a non-empty user question"))?;
        messages.retain(|m| m.role == "user" || m.role == "assistant");
        return Ok((last.content.trim().to_string(), messages));
    }
    match request.texts("question")?.as_slice() {
        [q] if !q.trim().is_empty() => Ok((q.trim().to_string(), Vec::new())),
        _ => Err(Error::invalid_input("`question` must hold one non-empty text")),
    }
}

eir_guest::export_plugin!(RagChat);
