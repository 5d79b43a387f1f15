//! A loaded language model as the registry holds it: weights and tokenizer, its chat
//! template, and the engine that runs its sequences.

use std::path::Path;
use std::sync::Arc;

use super::engine::{Engine, GenerateRequest, Generation, Settings};
use super::{ChatTemplate, LlmError, Message};
use crate::nn::NnError;
use crate::nn::backend::{Model, Named};
use crate::nn::backends::gguf::GgufModel;
use crate::nn::backends::gguf::tokenizer::Token;
use crate::nn::meter::Meter;

/// A GGUF model ready to generate.
pub struct Llm {
    gguf: Arc<GgufModel>,
    engine: Engine,
    template: Option<ChatTemplate>,
}

/// Markers that stand in for message texts while the template renders (private-use
/// characters, so a template passes them through unchanged): the template's own text is then
/// tokenized with control tokens, the messages' texts without, so a message can never forge
/// `<|im_start|>` or any other control token.
const OPEN: char = '\u{F0000}';
const CLOSE: char = '\u{F0001}';

impl Llm {
    /// Loads a GGUF file (see [`gguf_at`]) under `meter` and starts its engine.
    pub fn load(file: &Path, settings: Settings, meter: &Meter) -> Result<Llm, NnError> {
        let bytes = std::fs::read(file).map_err(|e| NnError::not_found(format!("{}: {e}", file.display())))?;
        let gguf = GgufModel::from_bytes(&bytes, meter)
            .map_err(|e| NnError { message: format!("{}: {}", file.display(), e.message), ..e })?;
        Self::new(Arc::new(gguf), settings)
    }

    /// Wraps a loaded model and starts its engine.
    pub fn new(gguf: Arc<GgufModel>, settings: Settings) -> Result<Llm, NnError> {
        let tok = &gguf.tokenizer;
        let template = match &gguf.chat_template {
            Some(src) => {
                let text = |t: u32| String::from_utf8_lossy(tok.token_bytes(t)).into_owned();
                Some(
                    ChatTemplate::new(src, &text(tok.bos), &text(tok.eos))
                        .map_err(|e| NnError::invalid_encoding(e.to_string()))?,
                )
            }
            None => None,
        };
        let engine = Engine::new(gguf.clone(), settings)
            .map_err(|e| NnError::runtime(format!("starting the generation thread: {e}")))?;
        Ok(Llm { gguf, engine, template })
    }

    /// The weights and tokenizer.
    pub fn gguf(&self) -> &Arc<GgufModel> {
        &self.gguf
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The prompt tokens for a chat: the model's template applied to `messages`, ending with
    /// the assistant's turn opened. Message texts are tokenized as plain text.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<Token>, LlmError> {
        let template = self.template.as_ref().ok_or_else(|| {
            LlmError::BadParameter("this model has no chat template; use the completions interface".into())
        })?;
        if messages.iter().any(|m| m.content.contains([OPEN, CLOSE])) {
            return Err(LlmError::BadParameter("messages may not contain U+F0000 or U+F0001".into()));
        }
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message { role: m.role.clone(), content: format!("{OPEN}{i}{CLOSE}") })
            .collect();
        let rendered = template.render(&marked, true)?;
        let tok = &self.gguf.tokenizer;
        let mut out = tok.add_bos.then_some(tok.bos).into_iter().collect::<Vec<_>>();
        let encode =
            |text: &str, special: bool| tok.encode(text, special).map_err(|e| LlmError::BadParameter(e.message));
        let mut rest = rendered.as_str();
        while let Some(at) = rest.find(OPEN) {
            out.extend(encode(&rest[..at], true)?);
            let after = &rest[at + OPEN.len_utf8()..];
            let end = after.find(CLOSE).ok_or_else(|| LlmError::Template("the chat template cut a message".into()))?;
            let i: usize =
                after[..end].parse().map_err(|_| LlmError::Template("the chat template altered a message".into()))?;
            let msg =
                messages.get(i).ok_or_else(|| LlmError::Template("the chat template altered a message".into()))?;
            out.extend(encode(&msg.content, false)?);
            rest = &after[end + CLOSE.len_utf8()..];
        }
        out.extend(encode(rest, true)?);
        Ok(out)
    }

    /// The prompt tokens of raw text (completions): no control tokens are parsed.
    pub fn text_prompt(&self, text: &str) -> Result<Vec<Token>, LlmError> {
        let tok = &self.gguf.tokenizer;
        let mut out = tok.add_bos.then_some(tok.bos).into_iter().collect::<Vec<_>>();
        out.extend(tok.encode(text, false).map_err(|e| LlmError::BadParameter(e.message))?);
        Ok(out)
    }

    /// The prompt tokens of text already in the model's chat format (what WasmEdge's GGML
    /// guests pass): control tokens written in it are parsed, as llama.cpp does. Only for
    /// callers that build the whole prompt themselves; user text belongs in
    /// [`Llm::chat_prompt`].
    pub fn templated_prompt(&self, text: &str) -> Result<Vec<Token>, LlmError> {
        let tok = &self.gguf.tokenizer;
        let mut out = tok.add_bos.then_some(tok.bos).into_iter().collect::<Vec<_>>();
        out.extend(tok.encode(text, true).map_err(|e| LlmError::BadParameter(e.message))?);
        Ok(out)
    }

    /// Starts a generation.
    pub fn generate(&self, req: GenerateRequest) -> Result<Generation, LlmError> {
        self.engine.submit(req)
    }
}

/// The GGUF file `path` is (or the one `.gguf` file directly inside the directory `path`), if
/// it is one: its first bytes say so.
pub fn gguf_at(path: &Path) -> Option<std::path::PathBuf> {
    let file = if path.is_dir() {
        match crate::nn::backend::files_with_extension(path, "gguf").ok()?.as_slice() {
            [one] => one.clone(),
            _ => return None,
        }
    } else {
        path.to_path_buf()
    };
    let mut head = [0u8; 4];
    std::fs::File::open(&file).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).ok()?;
    (&head == b"GGUF").then_some(file)
}

impl Model for Llm {
    fn family(&self) -> &'static str {
        "gguf"
    }

    fn input_names(&self) -> Vec<String> {
        Vec::new()
    }

    fn compute_with(&self, _inputs: Named, _meter: &Meter) -> Result<Named, NnError> {
        Err(NnError::unsupported(
            "a gguf language model generates text through EIR's generation API (the gateway's OpenAI-compatible \
             /v1 endpoints), not wasi-nn compute",
        ))
    }

    fn llm(&self) -> Option<&Llm> {
        Some(self)
    }
}
