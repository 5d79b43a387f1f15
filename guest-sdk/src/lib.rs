//! # eir-guest: write EIR plugins in Rust
//!
//! A plugin is one function from a [`Request`] (named input tensors and string parameters) to
//! a [`Response`] (named output tensors), compiled to a WebAssembly component for
//! `wasm32-wasip2`. This crate wraps the `eir:plugin` WIT bindings with typed accessors so that
//! no plugin has to touch raw bytes, and [`nn`] wraps wasi-nn for running models.
//!
//! ```ignore
//! use eir_guest::{Error, Plugin, Request, Response, Result, Tensor};
//!
//! struct Shout;
//!
//! impl Plugin for Shout {
//!     fn handle(request: Request) -> Result<Response> {
//!         let text = request.texts("text")?;
//!         let loud: Vec<String> = text.iter().map(|t| t.to_uppercase()).collect();
//!         Ok(Response::new().with(Tensor::strings("text", loud)))
//!     }
//! }
//!
//! eir_guest::export_plugin!(Shout);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release` and run it with
//! `eir run target/wasm32-wasip2/release/shout.wasm --input text=hello`.

#![warn(missing_docs)]

pub mod llm;
pub mod nn;
pub mod reply;
mod tensor;

/// The raw bindings generated from `wit/` (the `eir:plugin/pipeline` world), for what the
/// typed API does not cover.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "eir:plugin/pipeline",
        generate_all,
        pub_export_macro: true,
        export_macro_name: "__export_pipeline",
        default_bindings_module: "eir_guest::bindings",
    });
}

pub use bindings::eir::plugin::types::{
    Datatype, Error, ErrorCode, Metadata, Request, Response, Tensor, TensorData, TensorSpec,
};
pub use tensor::Element;

/// `Result` with the plugin [`Error`] as its default error.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// What a plugin implements. Only [`Plugin::handle`] is required.
pub trait Plugin {
    /// Describes the inputs and outputs (served as model metadata by the gateway).
    fn metadata() -> Metadata {
        Metadata { description: String::new(), inputs: Vec::new(), outputs: Vec::new() }
    }

    /// Handles one request.
    fn handle(request: Request) -> Result<Response>;
}

/// Exports a type implementing [`Plugin`] as the component's `eir:plugin/handler`.
///
/// Use it once, at the crate root of a `cdylib` crate.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __EirPluginExport;

        impl $crate::bindings::exports::eir::plugin::handler::Guest for __EirPluginExport {
            fn describe() -> $crate::Metadata {
                <$plugin as $crate::Plugin>::metadata()
            }

            fn handle(request: $crate::Request) -> ::core::result::Result<$crate::Response, $crate::Error> {
                <$plugin as $crate::Plugin>::handle(request)
            }
        }

        $crate::bindings::__export_pipeline!(__EirPluginExport with_types_in $crate::bindings);
    };
}

impl Error {
    /// A new error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// The request is malformed (HTTP 400).
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidInput, message)
    }

    /// Something the request names does not exist (HTTP 404).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// The plugin does not do what is asked (HTTP 400).
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unsupported, message)
    }

    /// A model failed (HTTP 500).
    pub fn model(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ModelError, message)
    }

    /// Anything else (HTTP 500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl Request {
    /// The input called `name`, or an `invalid-input` error naming it.
    pub fn input(&self, name: &str) -> Result<&Tensor> {
        self.inputs
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::invalid_input(format!("missing input `{name}`")))
    }

    /// The elements of input `name` as `T` (`f32`, `i64`, ...), with its shape.
    pub fn values<T: Element>(&self, name: &str) -> Result<(&[T], &[u64])> {
        let t = self.input(name)?;
        Ok((t.values::<T>()?, &t.shape))
    }

    /// The elements of the `BYTES` input `name` as UTF-8 strings.
    pub fn texts(&self, name: &str) -> Result<Vec<&str>> {
        self.input(name)?.texts()
    }

    /// The elements of the `BYTES` input `name` as byte strings (e.g. whole files).
    pub fn blobs(&self, name: &str) -> Result<&[Vec<u8>]> {
        self.input(name)?.blobs()
    }

    /// The parameter `name`, if given.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.parameters.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Every value of parameter `name`, in order (a parameter may be given more than once,
    /// e.g. `stop`).
    pub fn params<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.parameters.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The parameter `name` parsed as `T`, or `default` when absent; a value that does not
    /// parse is an `invalid-input` error.
    pub fn param_or<T: core::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.param(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| Error::invalid_input(format!("parameter `{name}`: cannot parse `{v}`"))),
        }
    }

    /// Whether the caller wants output `name` (all outputs are wanted when none were named).
    pub fn wants(&self, name: &str) -> bool {
        self.outputs.is_empty() || self.asks_for(name)
    }

    /// Whether the caller named output `name` among the outputs it asked for: an optional
    /// output asked for by name should be computed (or refused with a reason), not left out.
    pub fn asks_for(&self, name: &str) -> bool {
        self.outputs.iter().any(|o| o == name)
    }
}

impl Response {
    /// An empty response.
    pub fn new() -> Self {
        Self { outputs: Vec::new(), parameters: Vec::new() }
    }

    /// Adds an output tensor.
    pub fn with(mut self, tensor: Tensor) -> Self {
        self.outputs.push(tensor);
        self
    }

    /// Adds a response parameter.
    pub fn with_param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.parameters.push((name.into(), value.into()));
        self
    }
}

impl Default for Response {
    fn default() -> Self {
        Self::new()
    }
}

impl TensorSpec {
    /// Declares an input or output; use -1 for dimensions of any size.
    pub fn new(name: impl Into<String>, datatype: Datatype, shape: impl Into<Vec<i64>>) -> Self {
        Self { name: name.into(), datatype, shape: shape.into() }
    }
}

/// Writes a record to the host's log, tagged with this plugin's name.
pub fn log(level: bindings::eir::plugin::log::Level, message: &str) {
    bindings::eir::plugin::log::log(level, message);
}

pub use bindings::eir::plugin::log::Level as LogLevel;
