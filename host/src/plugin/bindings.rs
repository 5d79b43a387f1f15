//! Host bindings of EIR's `pipeline` world (`wit/eir.wit`).
//!
//! WASI interfaces are mapped onto wasmtime-wasi's own bindings, so one resource table serves
//! both; `wasi:nn` maps onto [`crate::nn::bindings`].

wasmtime::component::bindgen!({
    path: "../wit",
    world: "eir:plugin/pipeline",
    imports: { default: async | trappable },
    exports: { default: async },
    additional_derives: [PartialEq],
    with: {
        "wasi:io": wasmtime_wasi::p2::bindings::io,
        "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        "wasi:random": wasmtime_wasi::p2::bindings::random,
        "wasi:cli": wasmtime_wasi::p2::bindings::cli,
        "wasi:filesystem": wasmtime_wasi::p2::bindings::filesystem,
        "wasi:nn": crate::nn::bindings::wasi::nn,
        "eir:plugin/llm.model": crate::llm::host::ModelHandle,
        "eir:plugin/llm.generation": crate::llm::host::GenerationHandle,
    },
});

pub use self::eir::plugin::llm;
pub use self::eir::plugin::log;
pub use self::eir::plugin::reply;
pub use self::eir::plugin::types;
