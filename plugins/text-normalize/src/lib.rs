//! Text normalisation before tokenisation: Unicode normal form, lower-casing, accent stripping
//! and whitespace clean-up, element by element over a `BYTES` tensor of UTF-8 strings.
//!
//! Parameters (all optional): `form` = `nfc` | `nfd` | `nfkc` (default) | `nfkd` | `none`;
//! `lowercase` (default `true`); `strip_accents` (default `false`); `collapse_whitespace`
//! (default `true`: trims, and turns every run of whitespace and control characters into one
//! space).

use eir_guest::{Datatype, Error, Metadata, Plugin, Request, Response, Result, Tensor, TensorSpec};
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

struct TextNormalize;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    None,
    Nfc,
    Nfd,
    Nfkc,
    Nfkd,
}

struct Options {
    form: Form,
    lowercase: bool,
    strip_accents: bool,
    collapse_whitespace: bool,
}

impl Options {
    fn from_request(request: &Request) -> Result<Self> {
        let form = match request.param("form").unwrap_or("nfkc").to_ascii_lowercase().as_str() {
            "none" => Form::None,
            "nfc" => Form::Nfc,
            "nfd" => Form::Nfd,
            "nfkc" => Form::Nfkc,
            "nfkd" => Form::Nfkd,
            other => {
                return Err(Error::invalid_input(format!("parameter `form`: unknown normal form `{other}`")));
            }
        };
        Ok(Self {
            form,
            lowercase: request.param_or("lowercase", true)?,
            strip_accents: request.param_or("strip_accents", false)?,
            collapse_whitespace: request.param_or("collapse_whitespace", true)?,
        })
    }
}

fn normalize(text: &str, opts: &Options) -> String {
    let composed: String = match opts.form {
        Form::None => text.to_string(),
        Form::Nfc => text.nfc().collect(),
        Form::Nfd => text.nfd().collect(),
        Form::Nfkc => text.nfkc().collect(),
        Form::Nfkd => text.nfkd().collect(),
    };
    let mut text = if opts.lowercase { composed.to_lowercase() } else { composed };
    if opts.strip_accents {
        // Decompose, drop combining marks, then recompose what is left.
        let stripped: String = text.nfd().filter(|c| !is_combining_mark(*c)).collect();
        text = if opts.form == Form::Nfd || opts.form == Form::Nfkd { stripped } else { stripped.nfc().collect() };
    }
    if opts.collapse_whitespace {
        let mut out = String::with_capacity(text.len());
        for word in text.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
        text = out;
    }
    text
}

impl Plugin for TextNormalize {
    fn metadata() -> Metadata {
        Metadata {
            description: "Unicode-normalises, lower-cases and cleans up text".into(),
            inputs: vec![TensorSpec::new("text", Datatype::Bytes, [-1])],
            outputs: vec![TensorSpec::new("text", Datatype::Bytes, [-1])],
        }
    }

    fn handle(request: Request) -> Result<Response> {
        let opts = Options::from_request(&request)?;
        let input = request.input("text")?;
        let texts = input.texts()?;
        let out: Vec<String> = texts.iter().map(|t| normalize(t, &opts)).collect();
        let mut tensor = Tensor::strings("text", out);
        tensor.shape = input.shape.clone();
        Ok(Response::new().with(tensor))
    }
}

eir_guest::export_plugin!(TextNormalize);
