//! The one linker every plugin is instantiated against.
//!
//! It links the whole WASI 0.2 set, `wasi:sockets` and `wasi:http` included, because guest
//! toolchains of other languages import them by default; what a plugin may actually reach is
//! decided per call by its [`Grants`](crate::grants::Grants), and the network is denied unless
//! granted.

use wasmtime::component::{HasSelf, Linker};

use super::bindings;
use super::store::StoreState;
use crate::nn::Nn;

/// The linkers every plugin is instantiated against: one for components, one for core modules.
pub struct Linkers {
    /// For components.
    pub component: Linker<StoreState>,
    /// For core modules.
    pub module: wasmtime::Linker<StoreState>,
}

impl Linkers {
    /// Builds both.
    pub fn new(engine: &wasmtime::Engine) -> anyhow::Result<Self> {
        Ok(Self { component: build(engine)?, module: build_module_linker(engine)? })
    }
}

/// Builds the linker for core modules (`wasm32-wasip1` programs): WASI preview 1 and the
/// legacy `wasi_ephemeral_nn`.
pub fn build_module_linker(engine: &wasmtime::Engine) -> anyhow::Result<wasmtime::Linker<StoreState>> {
    let mut linker = wasmtime::Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, StoreState::p1)
        .map_err(|e| anyhow::anyhow!("linking WASI preview 1: {e:#}"))?;
    crate::nn::legacy::add_to_linker(&mut linker, StoreState::nn_mut)
        .map_err(|e| anyhow::anyhow!("linking wasi_ephemeral_nn: {e:#}"))?;
    Ok(linker)
}

/// Builds the linker with every host interface EIR provides.
pub fn build(engine: &wasmtime::Engine) -> anyhow::Result<Linker<StoreState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| anyhow::anyhow!("linking WASI 0.2: {e:#}"))?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(|e| anyhow::anyhow!("linking wasi:http: {e:#}"))?;
    bindings::log::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)
        .map_err(|e| anyhow::anyhow!("linking eir:plugin/log: {e:#}"))?;
    bindings::llm::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)
        .map_err(|e| anyhow::anyhow!("linking eir:plugin/llm: {e:#}"))?;
    bindings::reply::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)
        .map_err(|e| anyhow::anyhow!("linking eir:plugin/reply: {e:#}"))?;
    crate::nn::bindings::Ml::add_to_linker::<StoreState, Nn>(&mut linker, StoreState::nn_view)
        .map_err(|e| anyhow::anyhow!("linking wasi:nn: {e:#}"))?;
    Ok(linker)
}
