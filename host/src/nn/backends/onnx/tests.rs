//! Operator and compiler tests on small graphs built here, with expected values worked out
//! by hand (the two real models are checked against ONNX Runtime in `tests/e2e/onnx.rs`).

use candle_core::Device;
use prost::Message;

use super::Onnx;
use super::proto::attribute_proto::AttributeType;
use super::proto::tensor_proto::DataType;
use super::proto::type_proto::{self, Value};
use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, tensor_shape_proto,
};
use crate::nn::Model;
use crate::nn::bindings::tensor::TensorType;
use crate::nn::tensor::HostTensor;

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: v.to_vec(), ..Default::default() }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: v, ..Default::default() }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: format!("{op}_{}", outputs.join("_")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn model(nodes: Vec<NodeProto>, inputs: &[(&str, &[i64])], outputs: &[&str], opset: i64) -> Onnx {
    model_with(nodes, Vec::new(), inputs, outputs, opset)
}

/// [`model`] with initializers (constant inputs).
fn model_with(
    nodes: Vec<NodeProto>,
    initializer: Vec<TensorProto>,
    inputs: &[(&str, &[i64])],
    outputs: &[&str],
    opset: i64,
) -> Onnx {
    let graph = GraphProto {
        node: nodes,
        initializer,
        name: "test".into(),
        input: inputs.iter().map(|(n, d)| value(n, d)).collect(),
        output: outputs.iter().map(|n| ValueInfoProto { name: n.to_string(), ..Default::default() }).collect(),
        ..Default::default()
    };
    let proto = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
        graph: Some(graph),
        ..Default::default()
    };
    Onnx::from_bytes(&proto.encode_to_vec(), &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
}

fn run(m: &Onnx, inputs: &[(&str, &[u32], &[f32])]) -> Vec<(Vec<u32>, Vec<f32>)> {
    let named = inputs
        .iter()
        .map(|(n, d, v)| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.to_string(), HostTensor::new(d.to_vec(), TensorType::Fp32, bytes).unwrap())
        })
        .collect();
    m.compute(named)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|(_, t)| {
            (t.dims().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        })
        .collect()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn nodes_out_of_order_are_sorted() {
    let m = model(
        vec![node("Relu", &["a"], &["y"], vec![]), node("Neg", &["x"], &["a"], vec![])],
        &[("x", &[3])],
        &["y"],
        13,
    );
    close(&run(&m, &[("x", &[3], &[-1.0, 2.0, -3.0])])[0].1, &[1.0, 0.0, 3.0]);
}

#[test]
fn pooling_handles_padding_ceil_mode_and_count_include_pad() {
    // x = 1..16 as [1,1,4,4]; 3x3 windows, stride 2, pads 1.
    let x: Vec<f32> = (1..=16).map(|v| v as f32).collect();
    let pool = |op: &str, extra: Vec<AttributeProto>| {
        let mut attrs =
            vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1])];
        attrs.extend(extra);
        let m = model(vec![node(op, &["x"], &["y"], attrs)], &[("x", &[1, 1, 4, 4])], &["y"], 13);
        run(&m, &[("x", &[1, 1, 4, 4], &x)]).remove(0)
    };
    let (dims, max) = pool("MaxPool", vec![]);
    assert_eq!(dims, vec![1, 1, 2, 2]);
    close(&max, &[6.0, 8.0, 14.0, 16.0]);
    // Average without the padding: the top-left window covers 1,2,5,6.
    let (_, avg) = pool("AveragePool", vec![]);
    close(&avg, &[3.5, 5.0, 9.5, 11.0]);
    // With the padding counted, the same window is divided by 9.
    let (_, avg) = pool("AveragePool", vec![attr_int("count_include_pad", 1)]);
    assert!((avg[0] - 14.0 / 9.0).abs() < 1e-5, "{avg:?}");
    // ceil_mode on a 5-wide input with k=2, s=2: three columns, the last one partial.
    let m = model(
        vec![node(
            "MaxPool",
            &["x"],
            &["y"],
            vec![attr_ints("kernel_shape", &[1, 2]), attr_ints("strides", &[1, 2]), attr_int("ceil_mode", 1)],
        )],
        &[("x", &[1, 1, 1, 5])],
        &["y"],
        13,
    );
    let (dims, y) = run(&m, &[("x", &[1, 1, 1, 5], &[1.0, 5.0, 2.0, 4.0, 3.0])]).remove(0);
    assert_eq!(dims, vec![1, 1, 1, 3]);
    close(&y, &[5.0, 4.0, 3.0]);
}

#[test]
fn softmax_follows_its_opset() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let e = |v: &[f32]| -> Vec<f32> {
        let s: f32 = v.iter().map(|x| x.exp()).sum();
        v.iter().map(|x| x.exp() / s).collect()
    };
    // Opset 13: along the last axis, rows of two.
    let m = model(vec![node("Softmax", &["x"], &["y"], vec![])], &[("x", &[2, 2])], &["y"], 13);
    let y = run(&m, &[("x", &[2, 2], &x)]).remove(0).1;
    close(&y, &[e(&x[..2]), e(&x[2..])].concat());
    // Opset 11, axis 0: the whole tensor flattened into one row.
    let m = model(vec![node("Softmax", &["x"], &["y"], vec![attr_int("axis", 0)])], &[("x", &[2, 2])], &["y"], 11);
    close(&run(&m, &[("x", &[2, 2], &x)]).remove(0).1, &e(&x));
}

#[test]
fn layer_norm_normalises_the_trailing_axes() {
    let m = model(
        vec![node("LayerNormalization", &["x", "s", "b"], &["y"], vec![attr_int("axis", -1)])],
        &[("x", &[1, 4]), ("s", &[4]), ("b", &[4])],
        &["y"],
        17,
    );
    let y = run(
        &m,
        &[
            ("x", &[1, 4], &[1.0, 2.0, 3.0, 4.0]),
            ("s", &[4], &[1.0, 1.0, 2.0, 2.0]),
            ("b", &[4], &[0.0, 0.0, 0.0, 1.0]),
        ],
    )
    .remove(0)
    .1;
    let sd = (1.25f32 + 1e-5).sqrt();
    close(&y, &[-1.5 / sd, -0.5 / sd, 2.0 * 0.5 / sd, 2.0 * 1.5 / sd + 1.0]);
}

#[test]
fn reads_of_nothing_and_cycles_are_load_errors() {
    let proto = |nodes: Vec<NodeProto>| ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(GraphProto {
            node: nodes,
            input: vec![value("x", &[1])],
            output: vec![ValueInfoProto { name: "y".into(), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let dangling = proto(vec![node("Add", &["x", "ghost"], &["y"], vec![])]);
    let err = Onnx::from_bytes(&dangling.encode_to_vec(), &Device::Cpu).err().unwrap();
    assert!(err.message.contains("ghost"), "{err}");
    let cycle = proto(vec![
        node("Neg", &["b"], &["a"], vec![]),
        node("Neg", &["a"], &["b"], vec![]),
        node("Neg", &["a"], &["y"], vec![]),
    ]);
    let err = Onnx::from_bytes(&cycle.encode_to_vec(), &Device::Cpu).err().unwrap();
    assert!(err.message.contains("cycle"), "{err}");
}

#[test]
fn gemm_transposes_scales_and_adds_and_sees_new_weights() {
    // Wide enough (N ≥ 16) for EIR's GEMM, at every SIMD level, with a batch that leaves a
    // partial tile (and one of 27 rows: B in strips, at the AVX-512 level); B changes between runs, so what was derived from the first B must not be
    // reused for the second. Scaled by alpha, or not, with C as `[N]` or `[1, N]` (unscaled,
    // a row of C joins the product's epilogue).
    for ((m, k, n), level) in [(2usize, 3usize, 20usize), (9, 40, 37), (27, 40, 37)]
        .into_iter()
        .flat_map(|dims| crate::nn::kernels::simd::levels().into_iter().map(move |l| (dims, l)))
    {
        let _cap = crate::nn::kernels::simd::cap(level);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 2.0).collect();
        let c: Vec<f32> = (0..n).map(|i| i as f32 / 10.0).collect();
        for (trans_b, scale, c_dims) in [(1, 0.5, vec![n]), (0, 0.5, vec![n]), (1, 1.0, vec![n]), (0, 1.0, vec![1, n])]
        {
            let alpha = AttributeProto {
                name: "alpha".into(),
                r#type: AttributeType::Float as i32,
                f: scale,
                ..Default::default()
            };
            let b_dims: [i64; 2] = if trans_b == 1 { [n as i64, k as i64] } else { [k as i64, n as i64] };
            let c_shape: Vec<i64> = c_dims.iter().map(|&d| d as i64).collect();
            let g = model(
                vec![node("Gemm", &["a", "b", "c"], &["y"], vec![alpha, attr_int("transB", trans_b)])],
                &[("a", &[m as i64, k as i64]), ("b", &b_dims), ("c", &c_shape)],
                &["y"],
                13,
            );
            for seed in [1.0f32, -3.0] {
                let b: Vec<f32> = (0..k * n).map(|i| seed * ((i * 7 % 11) as f32 - 5.0)).collect();
                let at = |kk: usize, j: usize| if trans_b == 1 { b[j * k + kk] } else { b[kk * n + j] };
                let want: Vec<f32> = (0..m * n)
                    .map(|e| {
                        let (i, j) = (e / n, e % n);
                        scale * (0..k).map(|kk| a[i * k + kk] * at(kk, j)).sum::<f32>() + c[j]
                    })
                    .collect();
                let b_shape = [b_dims[0] as u32, b_dims[1] as u32];
                let c_shape: Vec<u32> = c_dims.iter().map(|&d| d as u32).collect();
                let (dims, y) =
                    run(&g, &[("a", &[m as u32, k as u32], &a), ("b", &b_shape, &b), ("c", &c_shape, &c)]).remove(0);
                assert_eq!(dims, vec![m as u32, n as u32]);
                close(&y, &want);
            }
        }
    }
}

#[test]
fn global_average_pool_averages_each_plane() {
    let m = model(vec![node("GlobalAveragePool", &["x"], &["y"], vec![])], &[("x", &[2, 2, 1, 3])], &["y"], 13);
    let x = [1.0, 2.0, 3.0, -3.0, 0.0, 6.0, 0.5, 0.5, 0.5, 9.0, 9.0, 9.0];
    let (dims, y) = run(&m, &[("x", &[2, 2, 1, 3], &x)]).remove(0);
    assert_eq!(dims, vec![2, 2, 1, 1]);
    close(&y, &[2.0, 1.0, 0.5, 9.0]);
}

/// The hostile fixtures (`tests/fixtures/make_hostile_onnx.py`), loaded and run directly on
/// every kernel path: each ends as the error the manifest names, at the stage it names.
#[test]
fn hostile_models_end_as_errors_of_their_kind() {
    use crate::nn::code_name;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hostile");
    let manifest: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("the hostile fixtures")).unwrap();
    for level in super::ops::simd_levels() {
        let _cap = super::ops::simd_cap(level);
        for case in &manifest {
            let file = case["file"].as_str().unwrap();
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let (stage, err) = match Onnx::from_bytes(&bytes, &Device::Cpu) {
                Err(e) => ("load", e),
                Ok(m) => {
                    let x = HostTensor::new(vec![1], TensorType::Fp32, 1e15f32.to_le_bytes().to_vec()).unwrap();
                    match m.compute(vec![("x".into(), x)]) {
                        Err(e) => ("compute", e),
                        Ok(out) => panic!("{file}: computed {} outputs", out.len()),
                    }
                }
            };
            assert_eq!(stage, case["stage"].as_str().unwrap(), "{file}: {err}");
            assert_eq!(code_name(err.code), case["code"].as_str().unwrap(), "{file}: {err}");
        }
    }
}

#[test]
fn a_compute_over_its_budget_is_too_large_and_holds_nothing_after() {
    use crate::nn::Meter;
    // y = MatMul(x, x^T) for x [n, 1]: an n x n output from n inputs.
    let m = model(
        vec![node("Transpose", &["x"], &["t"], vec![]), node("MatMul", &["x", "t"], &["y"], vec![])],
        &[("x", &[-1, 1])],
        &["y"],
        13,
    );
    let x = |n: u32| {
        let v = vec![0u8; 4 * n as usize];
        vec![("x".to_string(), HostTensor::new(vec![n, 1], TensorType::Fp32, v).unwrap())]
    };
    let meter = Meter::with_budget(1 << 20);
    let err = m.compute_with(x(4096), &meter).unwrap_err();
    assert_eq!(err.code, crate::nn::bindings::errors::ErrorCode::TooLarge, "{err}");
    assert!(err.message.contains("MatMul"), "the error names the node: {err}");
    assert_eq!(meter.live(), 0, "nothing stays reserved");
    let out = m.compute_with(x(64), &meter).unwrap();
    assert_eq!(out[0].1.dims(), &[64, 64]);
    assert!(meter.peak() <= 1 << 20 && meter.peak() > 64 * 64 * 4, "peak {}", meter.peak());
}

/// What the operators derive from a constant at load (a dense layer's weights transposed,
/// packed and in strips) is charged to the load budget before it is made: a budget that holds
/// the constant but not those is a too-large load naming them, and what loads keeps them
/// charged.
#[test]
fn packed_weights_are_charged_to_the_load_budget() {
    use crate::nn::Meter;
    let (k, n) = (64usize, 64usize);
    let graph = GraphProto {
        node: vec![node("MatMul", &["x", "w"], &["y"], vec![])],
        initializer: vec![TensorProto {
            name: "w".into(),
            dims: vec![k as i64, n as i64],
            data_type: DataType::Float as i32,
            float_data: vec![0.5; k * n],
            ..Default::default()
        }],
        name: "test".into(),
        input: vec![value("x", &[-1, k as i64])],
        output: vec![ValueInfoProto { name: "y".into(), ..Default::default() }],
        ..Default::default()
    };
    let proto = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(graph),
        ..Default::default()
    };
    let bytes = proto.encode_to_vec();
    let weights = (k * n * 4) as u64;
    // The constant fits, its derived copies (about three more of it) do not.
    let meter = Meter::for_load(2 * weights, Default::default(), None);
    let err = Onnx::from_bytes_with(&bytes, &Device::Cpu, &meter).map(|_| ()).unwrap_err();
    assert_eq!(err.code, crate::nn::bindings::errors::ErrorCode::TooLarge, "{err}");
    assert!(err.message.contains("packed weights"), "the error says what: {err}");
    let meter = Meter::for_load(16 * weights, Default::default(), None);
    Onnx::from_bytes_with(&bytes, &Device::Cpu, &meter).unwrap();
    assert!(meter.live() >= 4 * weights, "the constant and its derived weights stay charged: {}", meter.live());
}

#[test]
fn a_cancelled_compute_stops_at_the_next_node() {
    use crate::nn::{CancelToken, Meter};
    let m = model(vec![node("Relu", &["x"], &["y"], vec![])], &[("x", &[1])], &["y"], 13);
    let token = CancelToken::new();
    token.cancel();
    let meter = Meter::new(1 << 20, token, None);
    let x = HostTensor::new(vec![1], TensorType::Fp32, vec![0; 4]).unwrap();
    let err = m.compute_with(vec![("x".into(), x)], &meter).unwrap_err();
    assert_eq!(err.code, crate::nn::bindings::errors::ErrorCode::Timeout, "{err}");
    assert!(err.message.contains("Relu"), "{err}");
}

#[test]
fn a_long_chain_out_of_order_sorts_in_linear_time() {
    // 20,000 nodes in reverse order: Kahn's algorithm takes one pass.
    let n = 20_000;
    let names: Vec<String> = (0..=n)
        .map(|k| {
            if k == 0 {
                "x".into()
            } else if k == n {
                "y".into()
            } else {
                format!("v{k}")
            }
        })
        .collect();
    let nodes: Vec<NodeProto> =
        (0..n).rev().map(|k| node("Neg", &[names[k].as_str()], &[names[k + 1].as_str()], vec![])).collect();
    let m = model(nodes, &[("x", &[1])], &["y"], 13);
    close(&run(&m, &[("x", &[1], &[2.0])])[0].1, &[2.0]);
}

/// ONNX's LSTM equations in f64, one direction at a time: `x` is `[seq, batch, f]`, `w`
/// `[dirs, 4h, f]`, `r` `[dirs, 4h, h]`, `b` `[dirs, 8h]`, states `[dirs, batch, h]`; returns
/// Y (`[seq, dirs, batch, h]`), Y_h and Y_c.
#[allow(clippy::too_many_arguments)]
fn lstm_reference(
    [seq, batch, f, h]: [usize; 4],
    reverse: &[bool],
    clip: Option<f64>,
    x: &[f32],
    w: &[f32],
    r: &[f32],
    b: &[f32],
    h0: &[f32],
    c0: &[f32],
) -> [Vec<f32>; 3] {
    let dirs = reverse.len();
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    let mut y = vec![0f32; seq * dirs * batch * h];
    let (mut hn, mut cn) = (h0.to_vec(), c0.to_vec());
    for (d, &rev) in reverse.iter().enumerate() {
        for n in 0..batch {
            let mut hs: Vec<f64> = (0..h).map(|j| f64::from(h0[(d * batch + n) * h + j])).collect();
            let mut cs: Vec<f64> = (0..h).map(|j| f64::from(c0[(d * batch + n) * h + j])).collect();
            for step in 0..seq {
                let t = if rev { seq - 1 - step } else { step };
                let gate = |g: usize, hs: &[f64]| {
                    let row = d * 4 * h + g;
                    let mut v = f64::from(b[d * 8 * h + g]) + f64::from(b[d * 8 * h + 4 * h + g]);
                    v += (0..f).map(|i| f64::from(w[row * f + i]) * f64::from(x[(t * batch + n) * f + i])).sum::<f64>();
                    v += (0..h).map(|j| f64::from(r[row * h + j]) * hs[j]).sum::<f64>();
                    clip.map_or(v, |c| v.clamp(-c, c))
                };
                let z: Vec<f64> = (0..4 * h).map(|g| gate(g, &hs)).collect();
                for j in 0..h {
                    let (i, o, fg, c) = (sig(z[j]), sig(z[h + j]), sig(z[2 * h + j]), z[3 * h + j].tanh());
                    cs[j] = fg * cs[j] + i * c;
                    hs[j] = o * cs[j].tanh();
                    y[((t * dirs + d) * batch + n) * h + j] = hs[j] as f32;
                }
            }
            for j in 0..h {
                hn[(d * batch + n) * h + j] = hs[j] as f32;
                cn[(d * batch + n) * h + j] = cs[j] as f32;
            }
        }
    }
    [y, hn, cn]
}

#[test]
fn lstm_matches_its_equations_in_every_direction_and_sees_new_weights() {
    let (seq, batch, f, h) = (4usize, 3usize, 5usize, 7usize);
    let value = |i: usize, seed: usize| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0;
    let string = |name: &str, v: &str| AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    };
    for (direction, reverse, clip) in [
        ("forward", vec![false], None),
        ("reverse", vec![true], Some(0.5f32)),
        ("bidirectional", vec![false, true], None),
    ] {
        let dirs = reverse.len();
        let mut attrs = vec![attr_int("hidden_size", h as i64), string("direction", direction)];
        if let Some(c) = clip {
            attrs.push(AttributeProto {
                name: "clip".into(),
                r#type: AttributeType::Float as i32,
                f: c,
                ..Default::default()
            });
        }
        let (s, n, d4, dh) = (seq as i64, batch as i64, dirs as i64, h as i64);
        let g = model(
            vec![node("LSTM", &["x", "w", "r", "b", "", "h0", "c0"], &["y", "yh", "yc"], attrs)],
            &[
                ("x", &[s, n, f as i64]),
                ("w", &[d4, 4 * dh, f as i64]),
                ("r", &[d4, 4 * dh, dh]),
                ("b", &[d4, 8 * dh]),
                ("h0", &[d4, n, dh]),
                ("c0", &[d4, n, dh]),
            ],
            &["y", "yh", "yc"],
            14,
        );
        // New weights on the second run: what was derived from the first must not be reused.
        for seed in [1, 2] {
            let x: Vec<f32> = (0..seq * batch * f).map(|i| value(i, seed)).collect();
            let w: Vec<f32> = (0..dirs * 4 * h * f).map(|i| value(i, seed + 10)).collect();
            let r: Vec<f32> = (0..dirs * 4 * h * h).map(|i| value(i, seed + 20) * 0.5).collect();
            let b: Vec<f32> = (0..dirs * 8 * h).map(|i| value(i, seed + 30) * 0.3).collect();
            let h0: Vec<f32> = (0..dirs * batch * h).map(|i| value(i, seed + 40)).collect();
            let c0: Vec<f32> = (0..dirs * batch * h).map(|i| value(i, seed + 50)).collect();
            let (dirs32, batch32, h32) = (dirs as u32, batch as u32, h as u32);
            let got = run(
                &g,
                &[
                    ("x", &[seq as u32, batch32, f as u32], &x),
                    ("w", &[dirs32, 4 * h32, f as u32], &w),
                    ("r", &[dirs32, 4 * h32, h32], &r),
                    ("b", &[dirs32, 8 * h32], &b),
                    ("h0", &[dirs32, batch32, h32], &h0),
                    ("c0", &[dirs32, batch32, h32], &c0),
                ],
            );
            let want = lstm_reference([seq, batch, f, h], &reverse, clip.map(f64::from), &x, &w, &r, &b, &h0, &c0);
            assert_eq!(got[0].0, vec![seq as u32, dirs32, batch32, h32], "{direction}");
            for ((_, got), want) in got.iter().zip(&want) {
                close(got, want);
            }
        }
    }
}

/// Values for a block test's tensors: `n` of them, varied by `k`.
fn block_values(n: usize, k: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 31 + k * 7) % 17) as f32 / 16.0 - 0.5).collect()
}

/// A MobileNet block's constants: expand `we`/`be` (`c_in` → `c`), depthwise `wd`/`bd` (3x3),
/// project `wp`/`bp` (`c` → `m`), from [`block_values`] with `k` 1 to 6 in that order.
fn block_inits(c_in: usize, c: usize, m: usize) -> Vec<TensorProto> {
    let init = |name: &str, dims: &[usize], k: usize| TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        float_data: block_values(dims.iter().product(), k),
        ..Default::default()
    };
    vec![
        init("we", &[c, c_in, 1, 1], 1),
        init("be", &[c], 2),
        init("wd", &[c, 1, 3, 3], 3),
        init("bd", &[c], 4),
        init("wp", &[m, c, 1, 1], 5),
        init("bp", &[m], 6),
    ]
}

/// The block's nodes on [`block_inits`]: `x` → expand, Relu → depthwise (`c` channels, pads 1),
/// Relu → project → `y`, then `extra`.
fn block_nodes(c: usize, extra: Vec<NodeProto>) -> Vec<NodeProto> {
    let mut nodes = vec![
        node("Conv", &["x", "we", "be"], &["e"], vec![]),
        node("Relu", &["e"], &["er"], vec![]),
        node("Conv", &["er", "wd", "bd"], &["d"], vec![attr_int("group", c as i64), attr_ints("pads", &[1, 1, 1, 1])]),
        node("Relu", &["d"], &["dr"], vec![]),
        node("Conv", &["dr", "wp", "bp"], &["y"], vec![]),
    ];
    nodes.extend(extra);
    nodes
}

/// An expand, depthwise and project Conv (with their ReLUs) fuse into one step where nothing
/// else reads between them, and compute what the three compute one after the other; where the
/// depthwise output is also a graph output, or a second node reads it, that pair stays apart.
#[test]
fn convolution_blocks_fuse_only_where_nothing_else_reads_between() {
    let (c_in, c, m, h, w) = (3usize, 20usize, 5usize, 9usize, 9usize);
    let val = block_values;
    let inits = || block_inits(c_in, c, m);
    let block = |extra| block_nodes(c, extra);
    let x = val(2 * c_in * h * w, 7);
    let dims = [2u32, c_in as u32, h as u32, w as u32];
    let xd = [2i64, c_in as i64, h as i64, w as i64];
    let fused = model_with(block(vec![]), inits(), &[("x", &xd)], &["y"], 13);
    let shared = model_with(block(vec![]), inits(), &[("x", &xd)], &["y", "dr"], 13);
    let read_twice =
        model_with(block(vec![node("Neg", &["dr"], &["z"], vec![])]), inits(), &[("x", &xd)], &["y", "z"], 13);
    assert_eq!(fused.program.steps(), 1, "expand, depthwise and project in one step");
    assert_eq!(shared.program.steps(), 3, "the depthwise output is a graph output: no fusion after it");
    assert_eq!(read_twice.program.steps(), 4, "the depthwise output is read twice: no fusion after it");
    // The reference: the three convolutions by definition.
    let (we, be, wd, bd, wp, bp) = (val(c * c_in, 1), val(c, 2), val(c * 9, 3), val(c, 4), val(m * c, 5), val(m, 6));
    let mut want = Vec::new();
    for img in 0..2 {
        let px = |ch: usize, y: usize, xx: usize| x[((img * c_in + ch) * h + y) * w + xx];
        let e = |ch: usize, y: usize, xx: usize| {
            ((0..c_in).map(|i| we[ch * c_in + i] * px(i, y, xx)).sum::<f32>() + be[ch]).max(0.0)
        };
        let d = |ch: usize, y: usize, xx: usize| {
            let mut acc = bd[ch];
            for ky in 0..3 {
                for kx in 0..3 {
                    let (yy, xxx) = (y as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                    if (0..h as isize).contains(&yy) && (0..w as isize).contains(&xxx) {
                        acc += wd[ch * 9 + ky * 3 + kx] * e(ch, yy as usize, xxx as usize);
                    }
                }
            }
            acc.max(0.0)
        };
        for o in 0..m {
            for y in 0..h {
                for xx in 0..w {
                    want.push((0..c).map(|ch| wp[o * c + ch] * d(ch, y, xx)).sum::<f32>() + bp[o]);
                }
            }
        }
    }
    for g in [&fused, &shared, &read_twice] {
        let (ydims, y) = run(g, &[("x", &dims, &x)]).remove(0);
        assert_eq!(ydims, vec![2, m as u32, h as u32, w as u32]);
        let worst = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "worst {worst}");
    }
}

/// A residual `Add` of a fused block's output and the block's input joins the block (one step),
/// in either operand order, and adds exactly what the Add would; a residual that broadcasts
/// ([1, m, 1, 1]) joins too and is added after the pass; an Add whose other operand is made
/// after the block stays a step of its own.
#[test]
fn residual_additions_join_their_block() {
    // Two threads, so the block's split takes the fused pass (with more, it would run apart).
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a pool");
    pool.install(|| {
        let (c, m, h, w) = (12usize, 4usize, 7usize, 9usize);
        let n = 2usize;
        let xd = [n as i64, m as i64, h as i64, w as i64];
        let dims = [n as u32, m as u32, h as u32, w as u32];
        let x = block_values(n * m * h * w, 7);
        let s = block_values(m, 8);
        let plain = model_with(block_nodes(c, vec![]), block_inits(m, c, m), &[("x", &xd)], &["y"], 13);
        let (_, y) = run(&plain, &[("x", &dims, &x)]).remove(0);
        let cases = [
            (vec![node("Add", &["y", "x"], &["z"], vec![])], 1, false),
            (vec![node("Add", &["x", "y"], &["z"], vec![])], 1, false),
            (vec![node("Add", &["y", "s"], &["z"], vec![])], 1, true),
            // The other operand is made after the block: the block cannot take it.
            (vec![node("Neg", &["x"], &["nx"], vec![]), node("Add", &["y", "nx"], &["z"], vec![])], 3, false),
        ];
        for (k, (extra, steps, broadcast)) in cases.into_iter().enumerate() {
            let sd = [1i64, m as i64, 1, 1];
            let g = model_with(block_nodes(c, extra), block_inits(m, c, m), &[("x", &xd), ("s", &sd)], &["z"], 13);
            assert_eq!(g.program.steps(), steps, "case {k}");
            let (zdims, z) = run(&g, &[("x", &dims, &x), ("s", &[1, m as u32, 1, 1], &s)]).remove(0);
            assert_eq!(zdims, dims.to_vec(), "case {k}");
            for (j, (&got, &y)) in z.iter().zip(&y).enumerate() {
                let want = match (k, broadcast) {
                    (3, _) => y - x[j],
                    (_, true) => y + s[(j / (h * w)) % m],
                    _ => y + x[j],
                };
                assert!((got - want).abs() <= 1e-6, "case {k} at {j}: {got} vs {want}");
            }
        }
    });
}

/// A fused block's first passes on a shape each run one of the ways it can split (fused
/// ranges of several sizes, the expand apart, each convolution apart), timed to keep the
/// fastest: every one of them computes the same numbers, to the bit, so which one wins never
/// shows in a result.
#[test]
fn every_split_a_block_is_timed_on_computes_the_same_numbers() {
    // Holds the level where it is (the cap's lock): a test that caps it meanwhile would switch
    // kernels between passes, whose numbers then differ in their last bits.
    let _cap = crate::nn::kernels::simd::cap(crate::nn::kernels::simd::Level::Avx512);
    // 21 rows on 2 threads: ranges of several sizes, the expand fused or apart. A 7x7 plane on
    // 3 threads: ranges of 3 rows would leave a last one of 7 columns, which the GEMM runs
    // turned around (another order of summation), so they are not among the splits; running
    // channels last is. 400 channels: the project's reduction is deeper than one slice of the
    // GEMM's k.
    for (threads, h, w, at_least) in [(2, 21usize, 19usize, 4), (3, 7, 7, 2)] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
        pool.install(|| {
            let (c_in, c, m) = (5usize, 400usize, 24usize);
            let xd = [1i64, c_in as i64, h as i64, w as i64];
            let dims = [1u32, c_in as u32, h as u32, w as u32];
            // Not multiples of a power of two, or every sum would be exact in any order.
            let x: Vec<f32> = (0..c_in * h * w).map(|i| (i as f32 * 0.731).sin()).collect();
            let g = model_with(block_nodes(c, vec![]), block_inits(c_in, c, m), &[("x", &xd)], &["y"], 13);
            assert_eq!(g.program.steps(), 1);
            let (_, first) = run(&g, &[("x", &dims, &x)]).remove(0);
            for pass in 0..40 {
                let (_, y) = run(&g, &[("x", &dims, &x)]).remove(0);
                let same = y.iter().zip(&first).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{h}x{w} on {threads} threads: pass {pass} differs");
            }
            let runs = super::ops::SPLITS_RUN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut splits: Vec<&String> = runs.iter().filter(|(d, _)| d == &[1, c_in, h, w]).map(|(_, s)| s).collect();
            splits.sort();
            splits.dedup();
            // Where the GEMM's columns depend on their neighbours, only the rule's split runs.
            let timed = crate::nn::kernels::sgemm::columns_independent();
            let enough = if timed { splits.len() >= at_least } else { splits.len() == 1 };
            assert!(enough, "{h}x{w} on {threads} threads tried {splits:?}");
            // The 7x7 plane is small enough to run channels last, the rule there with AVX-512.
            let last = splits.iter().any(|s| s.as_str() == "ChannelsLast");
            assert_eq!(last, h == 7 && crate::nn::kernels::simd::avx512(), "{h}x{w} tried {splits:?}");
        });
    }
}

/// `Shape` and `Size` declare what they make however few elements their input has (a
/// `[1, 1, 1]` input's shape is 24 bytes, more than twice its 4): an output over its operator's
/// declared bound panics in tests (Silero VAD logged it as a warning on every chunk).
#[test]
fn shape_and_size_of_a_tiny_tensor_stay_within_their_bounds() {
    let m = model(
        vec![
            node("Shape", &["x"], &["s"], vec![]),
            node("Cast", &["s"], &["y"], vec![attr_int("to", DataType::Float as i64)]),
            node("Size", &["x"], &["n"], vec![]),
            node("Cast", &["n"], &["z"], vec![attr_int("to", DataType::Float as i64)]),
        ],
        &[("x", &[1, 1, 1])],
        &["y", "z"],
        13,
    );
    let out = run(&m, &[("x", &[1, 1, 1], &[5.0])]);
    close(&out[0].1, &[1.0, 1.0, 1.0]);
    close(&out[1].1, &[1.0]);
}

/// `MatMul` against a constant matrix (a dense layer: rows of a rank-3 input; 10 rows on the
/// packed, turned-around product, 27 on the weights in strips) and against a computed one (the
/// plain product) both equal the definition in f64.
#[test]
fn matmul_against_a_constant_and_a_computed_matrix_matches_the_definition() {
    let (k, n) = (24, 20);
    let val =
        |len: usize, s: usize| -> Vec<f32> { (0..len).map(|i| ((i * 13 + s * 5) % 19) as f32 / 9.0 - 1.0).collect() };
    let w = val(k * n, 1);
    let init = TensorProto {
        name: "w".into(),
        dims: vec![k as i64, n as i64],
        data_type: DataType::Float as i32,
        float_data: w.clone(),
        ..Default::default()
    };
    for (b0, b1) in [(2usize, 5usize), (3, 9)] {
        let rows = b0 * b1;
        let m = model_with(
            vec![node("MatMul", &["x", "w"], &["y"], vec![]), node("MatMul", &["x", "b"], &["z"], vec![])],
            vec![init.clone()],
            &[("x", &[b0 as i64, b1 as i64, k as i64]), ("b", &[k as i64, n as i64])],
            &["y", "z"],
            13,
        );
        let x = val(rows * k, 2);
        let out = run(&m, &[("x", &[b0 as u32, b1 as u32, k as u32], &x), ("b", &[k as u32, n as u32], &w)]);
        let want: Vec<f32> = (0..rows * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..k).map(|j| f64::from(x[r * k + j]) * f64::from(w[j * n + c])).sum::<f64>() as f32
            })
            .collect();
        for (dims, got) in &out {
            assert_eq!(dims, &[b0 as u32, b1 as u32, n as u32]);
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-4, "{rows} rows: worst {worst}");
        }
    }
}

/// A dense layer as exporters write it (MatMul by a matrix, Add of a constant bias, exact GELU
/// decomposed into Div or Mul, Erf, Add and two Muls, in Hugging Face's order and in PyTorch's)
/// runs as one step, by a constant matrix (40 rows: the weights in strips, bias and GELU in
/// its epilogue) and by a computed one (the plain product); the numbers match the definition
/// in f64. A decomposition whose inner value is also read elsewhere is left as it is.
#[test]
fn dense_layers_with_a_bias_and_gelu_fuse_into_one_step_and_match_the_definition() {
    let (rows, k, n) = (2 * 20, 24, 40);
    let val =
        |len: usize, s: usize| -> Vec<f32> { (0..len).map(|i| ((i * 13 + s * 5) % 19) as f32 / 9.0 - 1.0).collect() };
    let (w, bias, x) = (val(k * n, 1), val(n, 3), val(rows * k, 2));
    let tensor = |name: &str, dims: &[i64], v: &[f32]| TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: v.to_vec(),
        ..Default::default()
    };
    let consts = || {
        vec![
            tensor("w", &[k as i64, n as i64], &w),
            tensor("bias", &[n as i64], &bias),
            tensor("half", &[], &[0.5]),
            tensor("one", &[], &[1.0]),
            tensor("sqrt2", &[], &[std::f32::consts::SQRT_2]),
            tensor("inv_sqrt2", &[], &[std::f32::consts::FRAC_1_SQRT_2]),
        ]
    };
    let dense = |b: &str| vec![node("MatMul", &["x", b], &["m"], vec![]), node("Add", &["m", "bias"], &["y"], vec![])];
    let erf_of = |scaled: NodeProto| {
        vec![scaled, node("Erf", &["d"], &["e"], vec![]), node("Add", &["e", "one"], &["p"], vec![])]
    };
    let div = || node("Div", &["y", "sqrt2"], &["d"], vec![]);
    // Hugging Face: y·½ · (1 + erf(y/√2)).
    let hf = |b: &str, scaled: NodeProto| {
        let mut v = dense(b);
        v.extend(erf_of(scaled));
        v.extend([node("Mul", &["y", "half"], &["h"], vec![]), node("Mul", &["h", "p"], &["out"], vec![])]);
        v
    };
    // PyTorch: (y · (1 + erf(y/√2))) · ½.
    let torch = {
        let mut v = dense("w");
        v.extend(erf_of(div()));
        v.extend([node("Mul", &["p", "y"], &["t"], vec![]), node("Mul", &["t", "half"], &["out"], vec![])]);
        v
    };
    let inputs: [(&str, &[i64]); 2] = [("x", &[2, 20, k as i64]), ("b", &[k as i64, n as i64])];
    let cases = [
        ("Hugging Face's", hf("w", div()), &["out"][..], 1),
        ("PyTorch's", torch, &["out"][..], 1),
        ("times 1/√2", hf("w", node("Mul", &["inv_sqrt2", "y"], &["d"], vec![])), &["out"][..], 1),
        ("by a computed matrix", hf("b", div()), &["out"][..], 1),
        // erf's output is also a graph output: only the bias fuses.
        ("erf read twice", hf("w", div()), &["out", "e"][..], 6),
    ];
    // erf(z) in f64 (Abramowitz and Stegun 7.1.26: |error| < 1.5e-7).
    let erf = |z: f64| {
        let t = 1.0 / (1.0 + 0.3275911 * z.abs());
        let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
        (1.0 - poly * (-z * z).exp()).copysign(z)
    };
    let want: Vec<f32> = (0..rows * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let y = (0..k).map(|j| f64::from(x[r * k + j]) * f64::from(w[j * n + c])).sum::<f64>() + f64::from(bias[c]);
            (y * 0.5 * (1.0 + erf(y / std::f64::consts::SQRT_2))) as f32
        })
        .collect();
    for (name, nodes, outputs, steps) in cases {
        let m = model_with(nodes, consts(), &inputs, outputs, 13);
        assert_eq!(m.program.steps(), steps, "{name}");
        let out = run(&m, &[("x", &[2, 20, k as u32], &x), ("b", &[k as u32, n as u32], &w)]);
        assert_eq!(out[0].0, [2, 20, n as u32], "{name}");
        let worst = out[0].1.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{name}: worst {worst}");
    }
}

/// A dense layer whose bias is the `Add`'s first operand fuses too; and a product that has
/// taken its bias over is not an `Add` of two values: after a convolution block (which takes a
/// residual `Add` into itself), `MatMul(block, B) + bias` stays the product, not `block + B`.
#[test]
fn a_fused_bias_is_not_a_residual_add() {
    let (c_in, c, m, h, w) = (3usize, 20usize, 5usize, 9usize, 9usize);
    let xd = [2i64, c_in as i64, h as i64, w as i64];
    let dims = [2u32, c_in as u32, h as u32, w as u32];
    let x = block_values(2 * c_in * h * w, 7);
    let b = block_values(w * w, 8);
    let bias = block_values(w, 9);
    let bias_init = TensorProto {
        name: "bias".into(),
        dims: vec![w as i64],
        data_type: DataType::Float as i32,
        float_data: bias.clone(),
        ..Default::default()
    };
    let with = |add: NodeProto| {
        let mut inits = block_inits(c_in, c, m);
        inits.push(bias_init.clone());
        let nodes = block_nodes(c, vec![node("MatMul", &["y", "b"], &["mm"], vec![]), add]);
        model_with(nodes, inits, &[("x", &xd), ("b", &[w as i64, w as i64])], &["out"], 13)
    };
    let block = model_with(block_nodes(c, vec![]), block_inits(c_in, c, m), &[("x", &xd)], &["y"], 13);
    let y = &run(&block, &[("x", &dims, &x)])[0].1;
    let want: Vec<f32> = (0..y.len())
        .map(|i| {
            let (row, col) = (i / w, i % w);
            (0..w).map(|j| f64::from(y[row * w + j]) * f64::from(b[j * w + col])).sum::<f64>() as f32 + bias[col]
        })
        .collect();
    for (order, add) in [
        ("bias second", node("Add", &["mm", "bias"], &["out"], vec![])),
        ("bias first", node("Add", &["bias", "mm"], &["out"], vec![])),
    ] {
        let m = with(add);
        assert_eq!(m.program.steps(), 2, "{order}: the block, then the product with its bias");
        let out = run(&m, &[("x", &dims, &x), ("b", &[w as u32, w as u32], &b)]);
        let worst = out[0].1.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{order}: worst {worst}");
    }
}

/// Attention as exporters write it (`MatMul(Q, Kᵀ)`, a scale, a mask, a softmax, `MatMul` by V)
/// runs as one step, with the scale a `Mul` or a `Div` and the mask either operand, per row or
/// per key, or left out; its numbers are the unfused steps' (which run where the softmax's
/// output is also a graph output) and the definition's in f64.
#[test]
fn attention_fuses_into_one_step_and_computes_what_its_steps_do() {
    // Pinned (and held: tests that lower the level wait), so both paths run as chosen.
    let _cap = crate::nn::kernels::simd::cap(crate::nn::kernels::simd::Level::Avx512);
    // Small entries (gathered), and entries whose products run on strips (both wider than a strip).
    for (b, h, sq, sk, d, dv) in [(2usize, 3usize, 5usize, 6usize, 4usize, 7usize), (2, 3, 13, 37, 20, 33)] {
        let val = |len: usize, s: usize| -> Vec<f32> {
            (0..len).map(|i| ((i * 13 + s * 5) % 19) as f32 / 9.0 - 1.0).collect()
        };
        let (q, kt, v) = (val(b * h * sq * d, 1), val(b * h * d * sk, 2), val(b * h * sk * dv, 3));
        let scalar = |name: &str, x: f32| TensorProto {
            name: name.into(),
            dims: vec![],
            data_type: DataType::Float as i32,
            float_data: vec![x],
            ..Default::default()
        };
        let axis =
            AttributeProto { name: "axis".into(), r#type: AttributeType::Int as i32, i: -1, ..Default::default() };
        let tail = |x: &str| {
            vec![node("Softmax", &[x], &["p"], vec![axis.clone()]), node("MatMul", &["p", "v"], &["out"], vec![])]
        };
        let key_mask: Vec<f32> = (0..b * sk).map(|i| if i % sk == sk - 1 { -1e4 } else { 0.0 }).collect();
        let row_mask = val(h * sq * sk, 4);
        type Case<'a> = (&'a str, Vec<NodeProto>, Option<(Vec<i64>, &'a [f32])>, Option<(f32, bool)>);
        let cases: Vec<Case> = vec![
            (
                "Mul, mask per key",
                [
                    vec![
                        node("MatMul", &["q", "kt"], &["s"], vec![]),
                        node("Mul", &["c", "s"], &["sc"], vec![]),
                        node("Add", &["sc", "mask"], &["a"], vec![]),
                    ],
                    tail("a"),
                ]
                .concat(),
                Some((vec![b as i64, 1, 1, sk as i64], &key_mask)),
                Some((0.5, false)),
            ),
            (
                "Div, mask first, per row",
                [
                    vec![
                        node("MatMul", &["q", "kt"], &["s"], vec![]),
                        node("Div", &["s", "c"], &["sc"], vec![]),
                        node("Add", &["mask", "sc"], &["a"], vec![]),
                    ],
                    tail("a"),
                ]
                .concat(),
                Some((vec![h as i64, sq as i64, sk as i64], &row_mask)),
                Some((0.5, true)),
            ),
            ("no scale, no mask", [vec![node("MatMul", &["q", "kt"], &["s"], vec![])], tail("s")].concat(), None, None),
        ];
        for (name, nodes, mask, scale) in cases {
            let mut inputs: Vec<(&str, Vec<i64>)> = vec![
                ("q", vec![b as i64, h as i64, sq as i64, d as i64]),
                ("kt", vec![b as i64, h as i64, d as i64, sk as i64]),
                ("v", vec![b as i64, h as i64, sk as i64, dv as i64]),
            ];
            let mut feed: Vec<(&str, Vec<u32>, &[f32])> = vec![
                ("q", vec![b as u32, h as u32, sq as u32, d as u32], &q),
                ("kt", vec![b as u32, h as u32, d as u32, sk as u32], &kt),
                ("v", vec![b as u32, h as u32, sk as u32, dv as u32], &v),
            ];
            if let Some((dims, values)) = &mask {
                inputs.push(("mask", dims.clone()));
                feed.push(("mask", dims.iter().map(|&x| x as u32).collect(), values));
            }
            let inputs: Vec<(&str, &[i64])> = inputs.iter().map(|(n, d)| (*n, d.as_slice())).collect();
            let feed: Vec<(&str, &[u32], &[f32])> = feed.iter().map(|(n, d, v)| (*n, d.as_slice(), *v)).collect();
            let fused = model_with(nodes.clone(), vec![scalar("c", 0.5)], &inputs, &["out"], 13);
            let apart = model_with(nodes.clone(), vec![scalar("c", 0.5)], &inputs, &["out", "p"], 13);
            assert_eq!(fused.program.steps(), 1, "{name}");
            assert_eq!(apart.program.steps(), nodes.len(), "{name}: the softmax is read twice");
            let (got, want) = (run(&fused, &feed), run(&apart, &feed));
            assert_eq!(got[0].0, [b as u32, h as u32, sq as u32, dv as u32], "{name}");
            assert_eq!(got[0].1, want[0].1, "{name}: the fused step computes what the steps do");
            // The definition, in f64.
            for e in 0..b * h {
                for i in 0..sq {
                    let mut row: Vec<f64> = (0..sk)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|t| f64::from(q[(e * sq + i) * d + t]) * f64::from(kt[(e * d + t) * sk + j]))
                                .sum();
                            let scaled = match scale {
                                Some((c, true)) => dot / f64::from(c),
                                Some((c, false)) => dot * f64::from(c),
                                None => dot,
                            };
                            let m = match &mask {
                                Some((dims, values)) if dims.len() == 4 => f64::from(values[(e / h) * sk + j]),
                                Some((_, values)) => f64::from(values[((e % h) * sq + i) * sk + j]),
                                None => 0.0,
                            };
                            scaled + m
                        })
                        .collect();
                    let top = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    row.iter_mut().for_each(|x| *x = (*x - top).exp());
                    let sum: f64 = row.iter().sum();
                    for c in 0..dv {
                        let want: f64 = (0..sk).map(|j| row[j] / sum * f64::from(v[(e * sk + j) * dv + c])).sum();
                        let got = got[0].1[(e * sq + i) * dv + c];
                        assert!((f64::from(got) - want).abs() < 1e-4, "{name}: {got} against {want}");
                    }
                }
            }
        }
    }
}

/// The fused attention reads Q, Kᵀ and V where they lie when they come out of Transposes (as
/// exporters split heads), and computes what the unfused steps do on the copies.
#[test]
fn attention_reads_transposed_views_in_place() {
    // Pinned (and held: tests that lower the level wait), so both paths run as chosen.
    let _cap = crate::nn::kernels::simd::cap(crate::nn::kernels::simd::Level::Avx512);
    // Small entries (gathered), and entries whose products run on strips (Q read in place).
    for (b, h, sq, sk, d) in [(2usize, 3usize, 5usize, 6usize, 4usize), (2, 3, 13, 37, 24)] {
        let val = |len: usize, s: usize| -> Vec<f32> {
            (0..len).map(|i| ((i * 13 + s * 5) % 19) as f32 / 9.0 - 1.0).collect()
        };
        let (q, k, v) = (val(b * sq * h * d, 1), val(b * sk * h * d, 2), val(b * sk * h * d, 3));
        let perm = |p: &[i64]| attr_ints("perm", p);
        let axis =
            AttributeProto { name: "axis".into(), r#type: AttributeType::Int as i32, i: -1, ..Default::default() };
        let nodes = vec![
            node("Transpose", &["q"], &["qh"], vec![perm(&[0, 2, 1, 3])]),
            node("Transpose", &["k"], &["kt"], vec![perm(&[0, 2, 3, 1])]),
            node("Transpose", &["v"], &["vh"], vec![perm(&[0, 2, 1, 3])]),
            node("MatMul", &["qh", "kt"], &["s"], vec![]),
            node("Softmax", &["s"], &["p"], vec![axis]),
            node("MatMul", &["p", "vh"], &["out"], vec![]),
        ];
        let dims = [b as i64, sq as i64, h as i64, d as i64];
        let kdims = [b as i64, sk as i64, h as i64, d as i64];
        let inputs: [(&str, &[i64]); 3] = [("q", &dims), ("k", &kdims), ("v", &kdims)];
        let fused = model(nodes.clone(), &inputs, &["out"], 13);
        let apart = model(nodes, &inputs, &["out", "p"], 13);
        assert_eq!(fused.program.steps(), 4, "three Transposes and the attention");
        assert_eq!(apart.program.steps(), 6);
        let (ud, ukd) = ([b as u32, sq as u32, h as u32, d as u32], [b as u32, sk as u32, h as u32, d as u32]);
        let feed: [(&str, &[u32], &[f32]); 3] = [("q", &ud, &q), ("k", &ukd, &k), ("v", &ukd, &v)];
        let (got, want) = (run(&fused, &feed), run(&apart, &feed));
        assert_eq!(got[0].0, [b as u32, h as u32, sq as u32, d as u32]);
        assert_eq!(got[0].1, want[0].1);
    }
}

/// Entries on strips where Q and V come out of Transposes across their last two axes (Q
/// gathered, V packed down its columns) and the keys are more than a slice of the GEMM's k (the
/// value product sums in two slices): the unfused steps' numbers, to the bit.
#[test]
fn attention_on_strips_reads_any_strides() {
    let _cap = crate::nn::kernels::simd::cap(crate::nn::kernels::simd::Level::Avx512);
    if !crate::nn::kernels::simd::avx512() {
        eprintln!("no AVX-512: the strips path is not reached here");
        return;
    }
    let (b, h, sq, sk, d) = (1usize, 2usize, 9usize, 400usize, 24usize);
    let val =
        |len: usize, s: usize| -> Vec<f32> { (0..len).map(|i| ((i * 13 + s * 5) % 19) as f32 / 9.0 - 1.0).collect() };
    // Q and V given with their last two axes swapped; Kᵀ as it is.
    let (q, kt, v) = (val(b * h * d * sq, 1), val(b * h * d * sk, 2), val(b * h * d * sk, 3));
    let perm = |p: &[i64]| attr_ints("perm", p);
    let axis = AttributeProto { name: "axis".into(), r#type: AttributeType::Int as i32, i: -1, ..Default::default() };
    let nodes = vec![
        node("Transpose", &["q"], &["qh"], vec![perm(&[0, 1, 3, 2])]),
        node("Transpose", &["v"], &["vh"], vec![perm(&[0, 1, 3, 2])]),
        node("MatMul", &["qh", "kt"], &["s"], vec![]),
        node("Softmax", &["s"], &["p"], vec![axis]),
        node("MatMul", &["p", "vh"], &["out"], vec![]),
    ];
    let (qd, kd, vd) = (
        [b as i64, h as i64, d as i64, sq as i64],
        [b as i64, h as i64, d as i64, sk as i64],
        [b as i64, h as i64, d as i64, sk as i64],
    );
    let inputs: [(&str, &[i64]); 3] = [("q", &qd), ("kt", &kd), ("v", &vd)];
    let fused = model(nodes.clone(), &inputs, &["out"], 13);
    let apart = model(nodes, &inputs, &["out", "p"], 13);
    assert_eq!(fused.program.steps(), 3, "two Transposes and the attention");
    let u = |d: [i64; 4]| d.map(|x| x as u32);
    let (uq, uk, uv) = (u(qd), u(kd), u(vd));
    let feed: [(&str, &[u32], &[f32]); 3] = [("q", &uq, &q), ("kt", &uk, &kt), ("v", &uv, &v)];
    let (got, want) = (run(&fused, &feed), run(&apart, &feed));
    assert_eq!(got[0].0, [b as u32, h as u32, sq as u32, d as u32]);
    assert!(got[0].1.iter().zip(&want[0].1).all(|(a, b)| a.to_bits() == b.to_bits()), "not the unfused steps' bits");
}

/// Shapes the fused attention leaves to the unfused steps, which it then runs itself, within
/// the bytes it reserved (the executor checks that in tests): a mask that broadcasts over more
/// entries than Q has, a rank-1 `Kᵀ` (attention pooling); and two attentions in a chain, the
/// first one's output the second one's scores, which fold as one and leave the other apart.
#[test]
fn attention_shapes_it_does_not_fuse_run_as_the_steps_do() {
    let val =
        |len: usize, s: usize| -> Vec<f32> { (0..len).map(|i| ((i * 13 + s * 5) % 19) as f32 / 9.0 - 1.0).collect() };
    let axis = AttributeProto { name: "axis".into(), r#type: AttributeType::Int as i32, i: -1, ..Default::default() };
    let softmax = |x: &str, y: &str| node("Softmax", &[x], &[y], vec![axis.clone()]);
    let check = |name: &str, nodes: Vec<NodeProto>, inputs: &[(&str, &[i64])], steps: usize| {
        let fused = model(nodes.clone(), inputs, &["out"], 13);
        let apart = model(nodes, inputs, &["out", "p"], 13);
        assert_eq!(fused.program.steps(), steps, "{name}");
        let values: Vec<(String, Vec<u32>, Vec<f32>)> = inputs
            .iter()
            .enumerate()
            .map(|(k, (n, d))| {
                (n.to_string(), d.iter().map(|&x| x as u32).collect(), val(d.iter().product::<i64>() as usize, k))
            })
            .collect();
        let feed: Vec<(&str, &[u32], &[f32])> =
            values.iter().map(|(n, d, v)| (n.as_str(), d.as_slice(), v.as_slice())).collect();
        let (got, want) = (run(&fused, &feed), run(&apart, &feed));
        assert_eq!(got[0], want[0], "{name}");
    };
    let (b, dv) = (5i64, 1000i64);
    check(
        "a mask over more entries than Q",
        vec![
            node("MatMul", &["q", "kt"], &["s"], vec![]),
            node("Add", &["s", "mask"], &["a"], vec![]),
            softmax("a", "p"),
            node("MatMul", &["p", "v"], &["out"], vec![]),
        ],
        &[("q", &[1, 1, 1, 1]), ("kt", &[1, 1, 1, 1]), ("v", &[1, 1, 1, dv]), ("mask", &[b, 1, 1, 1])],
        1,
    );
    check(
        "a rank-1 Kᵀ",
        vec![
            node("MatMul", &["q", "kt"], &["s"], vec![]),
            softmax("s", "p"),
            node("MatMul", &["p", "v"], &["out"], vec![]),
        ],
        &[("q", &[5, 4]), ("kt", &[4]), ("v", &[5, 7])],
        1,
    );
    check(
        "two in a chain",
        vec![
            node("MatMul", &["q", "kt"], &["s"], vec![]),
            softmax("s", "p"),
            node("MatMul", &["p", "v"], &["o"], vec![]),
            softmax("o", "p2"),
            node("MatMul", &["p2", "w"], &["out"], vec![]),
        ],
        &[("q", &[2, 3, 5, 4]), ("kt", &[2, 3, 4, 6]), ("v", &[2, 3, 6, 6]), ("w", &[2, 3, 6, 7])],
        3,
    );
}
