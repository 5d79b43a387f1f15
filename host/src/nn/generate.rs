//! Language models (GGUF) behind wasi-nn, for both ABIs: one session per execution context
//! holds a prompt, options as JSON, and the generation.
//!
//! - The witx ABI (`wasi_ephemeral_nn`) speaks WasmEdge's GGML dialect, so guests written for
//!   its llama.cpp backend (the `wasmedge-wasi-nn` crate, LlamaEdge) run unchanged: a model
//!   opened by name with options (`load_by_name_with_config`), the prompt (already in the
//!   model's chat format) at input 0, more options at input 1, the whole answer from `compute`
//!   or one token per `compute_single`, the text at output 0 and metadata JSON
//!   (`input_tokens`, `output_tokens`) at output 1. Behaviour follows WasmEdge's backend where
//!   a guest can observe it: the prompt's control tokens are parsed; `compute` ends without
//!   error at the end of the turn or after `n-predict` tokens, with 101 when the context fills
//!   and 102 when the prompt does not fit; `compute_single` returns 100 at the end of the turn
//!   (and does not apply `n-predict`), and after any error the next `compute_single` starts
//!   over from the prompt. Differences: the end-of-turn token's text and a `reverse-prompt`
//!   are not part of the output (llama.cpp's backend appends them; guests strip them), and
//!   `ctx-size` is capped by the model's configured context.
//! - The standard WIT (`wasi:nn/inference`) follows a convention documented on
//!   [`crate::nn::host`]: tensors `prompt` and `options` in, `text` and `metadata` out, repeated
//!   `compute` for streaming.
//!
//! Generations join the model's continuous batch, charged to the calling tenant, bounded by
//! the call's deadline, and end when the caller goes away.

use std::sync::Arc;

use serde_json::Value;

use super::CancelToken;
use super::error::NnError;
use crate::llm::{Event, Finish, GenerateRequest, Generation, LlmError, Sampling};
use crate::nn::Model;

/// Most text a context accumulates (output 0); a longer answer ends with `too-large`.
const MAX_TEXT: usize = 1 << 20;
/// Most bytes of a JSON options document.
pub(crate) const MAX_OPTIONS: usize = 64 << 10;
/// Most bytes of a prompt.
pub(crate) const MAX_PROMPT_BYTES: usize = 4 << 20;

/// Why a GGML call failed: a wasi-nn error, or one of WasmEdge's own codes (100-102).
#[derive(Debug)]
pub(crate) enum Failure {
    Nn(NnError),
    /// 100: the model ended its turn (`compute_single`).
    EndOfSequence,
    /// 101: the sequence filled the context.
    ContextFull,
    /// 102: the prompt does not fit the context.
    PromptTooLong,
}

impl From<NnError> for Failure {
    fn from(e: NnError) -> Self {
        Failure::Nn(e)
    }
}

/// The generation options a guest may set (llama.cpp's defaults where it sets none).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Options {
    /// Most tokens `compute` generates; `None` (or -1): until the context fills.
    n_predict: Option<usize>,
    /// Tokens of context (prompt and answer); `None`: the model's.
    ctx_size: Option<usize>,
    temp: f32,
    top_p: f32,
    top_k: u32,
    min_p: f32,
    repeat_penalty: f32,
    seed: Option<u64>,
    reverse_prompt: Option<String>,
    /// The WIT convention's `stream`: each `compute` yields the next piece.
    pub(crate) stream: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            n_predict: None,
            ctx_size: None,
            temp: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.0,
            seed: None,
            reverse_prompt: None,
            stream: false,
        }
    }
}

impl Options {
    /// Applies a JSON object of options; keys it does not know are ignored, as WasmEdge does.
    /// Malformed JSON is `invalid-encoding`, a value of the wrong type `invalid-argument`.
    pub(crate) fn apply(&mut self, json: &[u8]) -> Result<(), NnError> {
        if json.len() > MAX_OPTIONS {
            return Err(NnError::too_large(format!("options of {} bytes (at most {MAX_OPTIONS})", json.len())));
        }
        let value: Value = serde_json::from_slice(json)
            .map_err(|e| NnError::invalid_encoding(format!("options are not JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(NnError::invalid_encoding("options must be a JSON object"));
        };
        // All or nothing: a refused document leaves the options as they were.
        let mut next = self.clone();
        let bad = |key: &str, want: &str| NnError::invalid_argument(format!("option `{key}` must be {want}"));
        let int = |key: &str, v: &Value| v.as_i64().ok_or_else(|| bad(key, "an integer"));
        let count = |key: &str, v: &Value| {
            let n = int(key, v)?;
            Ok::<_, NnError>(if n < 0 { None } else { Some(usize::try_from(n).unwrap_or(usize::MAX)) })
        };
        // Clamped at 0 as llama.cpp's parser does.
        let real = |key: &str, v: &Value| v.as_f64().map(|x| x.max(0.0) as f32).ok_or_else(|| bad(key, "a number"));
        for (key, v) in &fields {
            match key.as_str() {
                "n-predict" => next.n_predict = count(key, v)?,
                "ctx-size" => next.ctx_size = count(key, v)?.filter(|&n| n > 0),
                "temp" => next.temp = real(key, v)?,
                "top-p" => next.top_p = real(key, v)?.min(1.0),
                "top-k" => next.top_k = u32::try_from(int(key, v)?.max(0)).unwrap_or(u32::MAX),
                "min-p" => next.min_p = real(key, v)?.min(1.0),
                "repeat-penalty" => next.repeat_penalty = real(key, v)?,
                "seed" => {
                    // llama.cpp's "random seed" is -1 (or 0xFFFFFFFF).
                    let n = int(key, v)?;
                    next.seed = (n >= 0 && n != 0xFFFF_FFFF).then_some(n as u64);
                }
                "stream" => next.stream = v.as_bool().ok_or_else(|| bad(key, "true or false"))?,
                "reverse-prompt" => {
                    let s = v.as_str().ok_or_else(|| bad(key, "a string"))?;
                    next.reverse_prompt = (!s.is_empty()).then(|| s.to_string());
                }
                _ => {}
            }
        }
        *self = next;
        Ok(())
    }

    fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: if self.top_p <= 0.0 { 1.0 } else { self.top_p },
            min_p: self.min_p,
            repeat_penalty: if self.repeat_penalty <= 0.0 { 1.0 } else { self.repeat_penalty },
            seed: self.seed,
            ..Sampling::default()
        }
    }
}

/// What a generation needs of the call that runs it.
pub(crate) struct Call {
    pub(crate) tenant: Arc<crate::scheduler::Tenant>,
    pub(crate) deadline: std::time::Instant,
    pub(crate) abandoned: CancelToken,
    pub(crate) turn: crate::scheduler::TurnSlot,
}

impl Call {
    /// What the current call of `nn` gives a generation.
    pub(crate) fn of(nn: &super::NnCtx) -> Self {
        Self {
            tenant: nn.tenant.clone(),
            deadline: nn.deadline,
            abandoned: nn.abandoned.clone(),
            turn: nn.turn.clone(),
        }
    }
}

/// One execution context on a language model.
pub(crate) struct Session {
    model: Arc<dyn Model>,
    options: Options,
    prompt: Option<String>,
    input_tokens: usize,
    output_tokens: usize,
    /// The answer so far (output 0 of `get_output`).
    text: String,
    /// The last token's text (output 0 of `get_output_single`).
    last: String,
    /// The running `compute_single` generation, and whether reaching its token limit means
    /// the context is full.
    single: Option<(Generation, bool)>,
    /// How the last generation ended: `stop`, `length` or `context-full`.
    finish: Option<&'static str>,
}

impl Session {
    /// A context on `model` (a language model) with the graph's options.
    pub(crate) fn new(model: Arc<dyn Model>, options: Options) -> Self {
        Self {
            model,
            options,
            prompt: None,
            input_tokens: 0,
            output_tokens: 0,
            text: String::new(),
            last: String::new(),
            single: None,
            finish: None,
        }
    }

    /// Whether the options ask for one piece per `compute` (the WIT convention).
    pub(crate) fn streaming(&self) -> bool {
        self.options.stream
    }

    /// Bytes of the prompt it holds (charged to the call's tensor budget by the adapters).
    pub(crate) fn prompt_bytes(&self) -> u64 {
        self.prompt.as_ref().map_or(0, |p| p.len() as u64)
    }

    /// The token that cancels the running token-by-token generation, if any.
    pub(crate) fn running_token(&self) -> Option<CancelToken> {
        self.single.as_ref().map(|(g, _)| g.cancel_token())
    }

    /// Whether a token-by-token generation is under way.
    pub(crate) fn running(&self) -> bool {
        self.single.is_some()
    }

    /// How the last generation ended, once it has.
    pub(crate) fn finish(&self) -> Option<&'static str> {
        self.finish
    }

    /// Input 1 is options JSON; any other index the prompt (UTF-8), which also starts over.
    pub(crate) fn set_input(&mut self, index: u32, data: Vec<u8>) -> Result<(), NnError> {
        if index == 1 {
            return self.options.apply(&data);
        }
        let prompt = String::from_utf8(data).map_err(|_| NnError::invalid_argument("the prompt is not UTF-8"))?;
        self.prompt = Some(prompt);
        self.single = None;
        Ok(())
    }

    /// Starts a generation of the prompt: at most `n_predict` tokens when `limited`, else
    /// until the context fills. Returns whether reaching its token limit means "context full".
    fn start(&mut self, nn: &Call, limited: bool) -> Result<(Generation, bool), Failure> {
        let llm = self.model.llm().ok_or_else(|| NnError::unsupported("not a language model"))?;
        let prompt = self.prompt.as_deref().ok_or_else(|| NnError::invalid_argument("no prompt: set input 0 first"))?;
        let tokens = llm.templated_prompt(prompt).map_err(|e| NnError::invalid_argument(e.to_string()))?;
        let context = self.options.ctx_size.map_or(llm.engine().context(), |n| n.min(llm.engine().context()));
        // llama.cpp's backend keeps 4 tokens of room.
        if tokens.len() + 4 > context {
            return Err(Failure::PromptTooLong);
        }
        let room = context - tokens.len();
        let (max_tokens, fills) = match self.options.n_predict {
            Some(n) if limited && n < room => (n, false),
            _ => (room, true),
        };
        self.input_tokens = tokens.len();
        self.output_tokens = 0;
        self.finish = None;
        self.text.clear();
        self.last.clear();
        if max_tokens == 0 {
            return Err(Failure::Nn(NnError::invalid_argument("n-predict is 0")));
        }
        let generation = llm
            .generate(GenerateRequest {
                prompt: tokens,
                sampling: self.options.sampling(),
                max_tokens,
                stop: self.options.reverse_prompt.iter().cloned().collect(),
                tenant: nn.tenant.clone(),
                deadline: Some(nn.deadline),
            })
            .map_err(|e| match e {
                LlmError::BadParameter(m) => Failure::Nn(NnError::invalid_argument(m)),
                LlmError::PromptTooLong(_) => Failure::PromptTooLong,
                // wasi-nn's "busy" (the witx errno; `timeout` in the WIT): retry later.
                LlmError::Busy(m) => Failure::Nn(NnError::timeout(m)),
                LlmError::Template(m) | LlmError::Compute(m) => Failure::Nn(NnError::runtime(m)),
            })?;
        Ok((generation, fills))
    }

    /// Takes one chunk; `Ok(None)` when the generation ended normally (stop or length).
    async fn step(&mut self, g: &mut Generation, fills: bool, nn: &Call) -> Result<Option<()>, Failure> {
        let Ok(event) = g.next_or(&nn.tenant, &nn.turn, nn.abandoned.cancelled()).await else {
            g.cancel();
            return Err(NnError::timeout("the caller went away").into());
        };
        match event {
            Some(Event::Chunk { text, tokens }) => {
                if self.text.len() + text.len() > MAX_TEXT {
                    g.cancel();
                    return Err(NnError::too_large(format!("the answer outgrew {MAX_TEXT} bytes")).into());
                }
                self.output_tokens += tokens.len();
                self.text.push_str(&text);
                self.last = text;
                Ok(Some(()))
            }
            Some(Event::Done { finish, error, .. }) => match finish {
                Finish::Stop => {
                    self.finish = Some("stop");
                    Ok(None)
                }
                Finish::Length if !fills => {
                    self.finish = Some("length");
                    Ok(None)
                }
                Finish::Length | Finish::ContextFull => {
                    self.finish = Some("context-full");
                    Err(Failure::ContextFull)
                }
                Finish::Deadline => Err(NnError::timeout("the call's deadline passed").into()),
                Finish::Cancelled => Err(NnError::timeout("the generation was cancelled").into()),
                Finish::Error => Err(NnError::runtime(error.unwrap_or_default()).into()),
            },
            None => Err(NnError::runtime("the generation ended early").into()),
        }
    }

    /// Generates the whole answer.
    pub(crate) async fn compute(&mut self, nn: &Call) -> Result<(), Failure> {
        self.single = None;
        let (mut g, fills) = self.start(nn, true)?;
        while self.step(&mut g, fills, nn).await?.is_some() {}
        Ok(())
    }

    /// Generates one more token (the first call after a prompt evaluates it first); 100 once
    /// the model ended its turn. After any error the next call starts over.
    /// WasmEdge's `compute_single` does not apply `n-predict` (`limited` false); the WIT
    /// convention does.
    pub(crate) async fn compute_single(&mut self, nn: &Call, limited: bool) -> Result<(), Failure> {
        let (mut g, fills) = match self.single.take() {
            Some(g) => g,
            None => self.start(nn, limited)?,
        };
        // (The engine's last chunk may flush held-back text without a token; it is read as
        // one more piece.)
        match self.step(&mut g, fills, nn).await? {
            Some(()) => {
                self.single = Some((g, fills));
                Ok(())
            }
            None => Err(Failure::EndOfSequence),
        }
    }

    /// Ends a `compute_single` generation and clears the outputs.
    pub(crate) fn fini_single(&mut self) {
        self.single = None;
        self.finish = None;
        self.text.clear();
        self.last.clear();
        self.output_tokens = 0;
    }

    /// Output 0: the answer so far (`single`: the last token's text); output 1: metadata.
    pub(crate) fn output(&self, index: u32, single: bool) -> Result<std::borrow::Cow<'_, [u8]>, NnError> {
        match index {
            0 if single => Ok(self.last.as_bytes().into()),
            0 => Ok(self.text.as_bytes().into()),
            1 => Ok(self.metadata(false).into()),
            _ => Err(NnError::invalid_argument(format!("no output {index} (0: text, 1: metadata)"))),
        }
    }

    /// The metadata JSON: WasmEdge's fields, and with `finish` how the generation ended.
    pub(crate) fn metadata(&self, finish: bool) -> Vec<u8> {
        let mut m = serde_json::json!({
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            // Guests parse these fields; EIR runs no llama.cpp build.
            "llama_build_number": 0,
            "llama_commit": concat!("eir-", env!("CARGO_PKG_VERSION")),
        });
        if finish {
            m["finish"] = serde_json::json!(self.finish);
        }
        m.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_as_llama_cpp_does() {
        let mut o = Options::default();
        o.apply(
            br#"{"n-predict": 64, "ctx-size": 512, "temp": 0.0, "top-p": 0.9, "repeat-penalty": 1.1,
                     "seed": 42, "reverse-prompt": "User:", "stream-stdout": true, "enable-log": false}"#,
        )
        .unwrap();
        assert_eq!(o.n_predict, Some(64));
        assert_eq!(o.ctx_size, Some(512));
        assert_eq!((o.temp, o.top_p, o.repeat_penalty, o.seed), (0.0, 0.9, 1.1, Some(42)));
        assert_eq!(o.reverse_prompt.as_deref(), Some("User:"));
        // -1 is "unlimited" / "random"; negative reals clamp to 0.
        o.apply(br#"{"n-predict": -1, "seed": -1, "temp": -3}"#).unwrap();
        assert_eq!((o.n_predict, o.seed, o.temp), (None, None, 0.0));
    }

    #[test]
    fn bad_options_are_refused_by_kind() {
        use crate::nn::bindings::errors::ErrorCode;
        let mut o = Options::default();
        let kind = |o: &mut Options, json: &[u8]| o.apply(json).unwrap_err().code;
        assert_eq!(kind(&mut o, b"{not json"), ErrorCode::InvalidEncoding);
        assert_eq!(kind(&mut o, b"[1, 2]"), ErrorCode::InvalidEncoding);
        assert_eq!(kind(&mut o, br#"{"n-predict": "many"}"#), ErrorCode::InvalidArgument);
        assert_eq!(kind(&mut o, br#"{"n-predict": 1.5}"#), ErrorCode::InvalidArgument);
        assert_eq!(kind(&mut o, br#"{"reverse-prompt": 3}"#), ErrorCode::InvalidArgument);
        assert_eq!(kind(&mut o, &vec![b' '; MAX_OPTIONS + 1]), ErrorCode::TooLarge);
        assert_eq!(kind(&mut o, br#"{"n-predict": 5, "temp": "hot"}"#), ErrorCode::InvalidArgument);
        assert_eq!(o, Options::default(), "a refused document changes nothing");
    }
}
