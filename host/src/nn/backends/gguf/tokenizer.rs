//! The tokenizer a GGUF file describes (`tokenizer.ggml.*`), on the `tokenizers` crate.
//!
//! Only byte-level BPE (`model = "gpt2"`) is supported, with the pre-tokenizer the file names:
//! `smollm` splits digits one by one before GPT-2's byte-level regex (as SmolLM2's own
//! `tokenizer.json` does); candle's `TokenizerFromGguf` ignores `pre` and would merge digit runs.
//! Control tokens (`<|im_start|>`, ...) are matched only where the caller asks for them
//! ([`Tokenizer::encode`] with `special`), so text from a user can never forge them.

use std::collections::HashMap;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use super::file::{Gguf, Value};
use crate::nn::error::NnError;

/// A token id.
pub type Token = u32;

/// A byte-level BPE tokenizer with its control tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Control tokens by text, longest first (matched greedily in [`Tokenizer::encode`]).
    specials: Vec<(String, Token)>,
    /// Each token's bytes (byte-level alphabet undone; control tokens as their text).
    bytes: Vec<Vec<u8>>,
    /// Beginning of sequence.
    pub bos: Token,
    /// End of sequence.
    pub eos: Token,
    /// Whether prompts start with `bos`.
    pub add_bos: bool,
    /// Tokens that end a turn (eos, and `<|im_end|>` / `<|eot_id|>` / `<|endoftext|>` if present).
    pub end_of_turn: Vec<Token>,
}

fn bad(what: impl std::fmt::Display) -> NnError {
    NnError::invalid_encoding(format!("GGUF tokenizer: {what}"))
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub fn from_gguf(g: &Gguf<'_>) -> Result<Tokenizer, NnError> {
        let model = g.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(bad(format!("model `{model}` (EIR supports byte-level BPE, `gpt2`)")));
        }
        let pre = g.str("tokenizer.ggml.pre").unwrap_or("default");
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
            "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
            other => return Err(bad(format!("pre-tokenizer `{other}` (EIR knows `smollm` and `gpt2`)"))),
        };
        let tokens: Vec<&str> = g
            .array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s.as_str()),
                _ => Err(bad("tokens must be strings")),
            })
            .collect::<Result<_, _>>()?;
        let n = tokens.len();
        let types: Vec<i64> = match g.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) if a.len() == n => {
                a.iter().map(|v| if let Value::I64(t) = v { *t } else { 1 }).collect()
            }
            Some(_) => return Err(bad(format!("token_type must list one type per token ({n})"))),
            None => vec![1; n],
        };
        let merges: Vec<(String, String)> = g
            .array("tokenizer.ggml.merges")?
            .iter()
            .map(|v| match v {
                Value::Str(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("merge `{s}` is not two tokens"))),
                _ => Err(bad("merges must be strings")),
            })
            .collect::<Result<_, _>>()?;
        let mut vocab = Vocab::default();
        for (id, t) in tokens.iter().enumerate() {
            if vocab.insert(t.to_string(), id as Token).is_some() {
                return Err(bad(format!("token `{t}` appears twice")));
            }
        }
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| bad(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));

        let id = |key: &str| -> Result<Option<Token>, NnError> {
            match g.metadata.get(key) {
                None => Ok(None),
                Some(Value::U64(v)) if (*v as usize) < n => Ok(Some(*v as Token)),
                Some(v) => Err(bad(format!("`{key}` = {v:?} is not a token id below {n}"))),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?.ok_or_else(|| bad("no bos_token_id"))?;
        let eos = id("tokenizer.ggml.eos_token_id")?.ok_or_else(|| bad("no eos_token_id"))?;
        let add_bos = matches!(g.metadata.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));

        // Control (3) and user-defined (4) tokens are matched as whole strings.
        let mut specials: Vec<(String, Token)> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, 3 | 4))
            .map(|(id, _)| (tokens[id].to_string(), id as Token))
            .filter(|(s, _)| !s.is_empty())
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let unbyte = byte_decoder();
        let bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, ty)| match ty {
                3 | 4 => t.as_bytes().to_vec(),
                // Characters outside the byte-level alphabet stay as their UTF-8.
                _ => t
                    .chars()
                    .flat_map(|c| unbyte.get(&c).map_or_else(|| c.to_string().into_bytes(), |b| vec![*b]))
                    .collect(),
            })
            .collect();
        let mut end_of_turn = vec![eos];
        for name in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"] {
            if let Some((_, id)) = specials.iter().find(|(s, _)| s == name)
                && !end_of_turn.contains(id)
            {
                end_of_turn.push(*id);
            }
        }
        Ok(Tokenizer { inner, specials, bytes, bos, eos, add_bos, end_of_turn })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    /// Tokenizes `text`; with `special`, control-token strings in it become those tokens
    /// (use only for text EIR rendered itself, such as a chat template's output).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<Token>, NnError> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = if special {
                self.specials
                    .iter()
                    .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                    .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)))
            } else {
                None
            };
            let (plain, special_tok, after) = match next {
                Some((at, len, id)) => (&rest[..at], Some(id), &rest[at + len..]),
                None => (rest, None, ""),
            };
            if !plain.is_empty() {
                let enc = self.inner.encode_fast(plain, false).map_err(|e| NnError::invalid_argument(e.to_string()))?;
                out.extend_from_slice(enc.get_ids());
            }
            out.extend(special_tok);
            rest = after;
        }
        Ok(out)
    }

    /// The bytes of one token (a token may hold part of a UTF-8 character).
    pub fn token_bytes(&self, token: Token) -> &[u8] {
        self.bytes.get(token as usize).map_or(&[], Vec::as_slice)
    }

    /// The text of `tokens`, with any incomplete UTF-8 replaced.
    pub fn decode(&self, tokens: &[Token]) -> String {
        let bytes: Vec<u8> = tokens.iter().flat_map(|&t| self.token_bytes(t).iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether `token` ends a turn.
    pub fn ends_turn(&self, token: Token) -> bool {
        self.end_of_turn.contains(&token)
    }
}

/// GPT-2's byte-level alphabet, inverted: the printable character standing for each byte.
fn byte_decoder() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
        let c = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, b);
    }
    map
}

/// Turns a stream of token bytes into text without splitting a UTF-8 character: bytes of an
/// incomplete character wait for the next token.
#[derive(Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// Adds a token's bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // SAFETY-free: `from_utf8` proved the prefix valid.
                    out.push_str(std::str::from_utf8(&self.pending[..good]).unwrap_or_default());
                    match e.error_len() {
                        // An invalid sequence: emit U+FFFD and skip it.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..good + len);
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: any incomplete character left becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_alphabet_is_a_bijection() {
        let m = byte_decoder();
        assert_eq!(m.len(), 256);
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'a'], b'a');
    }

    #[test]
    fn streamed_text_never_splits_a_character() {
        let mut s = TextStream::default();
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(s.push(&euro[..1]), "");
        assert_eq!(s.push(&euro[1..2]), "");
        assert_eq!(s.push(&[euro[2], b'!']), "€!");
        // An invalid byte is replaced, and what follows still streams.
        assert_eq!(s.push(&[0xff, b'o', b'k']), "\u{fffd}ok");
        assert_eq!(s.push(&"🎉".as_bytes()[..2]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }
}
