//! Host bindings of `wasi:nn@0.2.0-rc-2024-10-28` (`wit/deps/nn`), with the spec's resources
//! mapped onto EIR's host types. Every import is async, so compute can leave the executor.

wasmtime::component::bindgen!({
    path: "../wit/deps/nn",
    world: "ml",
    imports: { default: async | trappable },
    with: {
        "wasi:nn/tensor.tensor": crate::nn::tensor::HostTensor,
        "wasi:nn/graph.graph": crate::nn::graph::HostGraph,
        "wasi:nn/inference.graph-execution-context": crate::nn::graph::HostContext,
        "wasi:nn/errors.error": crate::nn::error::NnError,
    },
});

pub use self::wasi::nn::{errors, graph, inference, tensor};
