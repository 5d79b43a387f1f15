//! EIR, the Edge Inference Runtime.
//!
//! A wasmtime host for WebAssembly pipeline plugins. The modules follow the way a request
//! travels:
//!
//! - [`engine`]: the wasmtime engine, the epoch ticker, and the on-disk compile cache.
//! - [`limits`]: fuel, deadline, memory and size limits, and how a violation is named.
//! - [`grants`]: what a plugin may touch (directories, environment, network, stdio).
//! - [`plugin`]: loading a component and calling it under its limits and grants.
//! - [`nn`]: the wasi-nn host on candle: tensors, the backend trait, model families.
//! - [`scheduler`]: every forward pass: per-model queues, dynamic batching, fair share across
//!   tenants, memory admission, cancellation, on one compute pool.
//! - [`llm`]: text generation on GGUF models: chat templates, sampling, and the engine that
//!   batches every sequence of a model continuously, per tenant.
//! - [`registry`]: models by name, loaded once and shared; pinned model packages.
//! - [`tensor`]: the tensors plugins exchange, and their KServe v2 JSON form.
//! - [`config`]: the TOML configuration (models, plugins, limits, grants), validated with
//!   file and line in every error.
//! - [`runtime`]: one engine + linker from which plugins are loaded.
//! - [`gateway`]: `eir serve`, the multi-tenant KServe v2 gateway.
//! - [`bundle`]: plugins and models packaged as OCI artifacts, pushed and pulled through
//!   registries.
//! - [`cli`]: the `eir` command, a thin layer over the above.

pub mod alloc;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod engine;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod grants;
pub mod limits;
pub mod llm;
pub mod nn;
pub mod plugin;
pub mod registry;
pub mod runtime;
pub mod scheduler;
pub mod tensor;

pub use runtime::Runtime;
