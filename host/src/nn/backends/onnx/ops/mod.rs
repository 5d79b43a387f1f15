//! ONNX operators. Each is built once at load time from its node (attributes parsed and
//! checked then), and run many times on candle tensors.

mod control;
mod conv;
mod depthwise;
mod elementwise;
mod nn;
mod reduce;
mod rnn;
mod shape;
mod stem;
mod tune;

use candle_core::{DType, Tensor};

use super::proto::{AttributeProto, NodeProto, attribute_proto::AttributeType};
use super::tensor::from_proto;
use crate::nn::error::NnError;
use crate::nn::meter::{bytes_of, mul};

pub(super) use crate::nn::kernels::sgemm::Clamp;
#[cfg(test)]
pub(super) use crate::nn::kernels::simd::{cap as simd_cap, levels as simd_levels};
pub(super) use control::constant_value;
#[cfg(test)]
pub(super) use nn::SPLITS_RUN;
pub(super) use nn::attention;

/// Data an operator derives from its inputs (packed or transposed weights), kept between runs
/// for as long as those inputs are the same tensors (`K`: one tensor's id, or a tuple of them):
/// initializers are, so a model derives once.
pub(super) struct Derived<T, K = candle_core::TensorId>(std::sync::Mutex<Option<(K, std::sync::Arc<T>)>>);

impl<T, K> Default for Derived<T, K> {
    fn default() -> Self {
        Derived(std::sync::Mutex::new(None))
    }
}

impl<T, K: PartialEq> Derived<T, K> {
    /// What was derived from the tensors `key`, made by `make` if it is not kept yet.
    pub(super) fn get(&self, key: K, make: impl FnOnce() -> T) -> std::sync::Arc<T> {
        // A poisoned lock only means a panic elsewhere mid-update; the slot is replaced whole.
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some((id, kept)) if *id == key => kept.clone(),
            _ => {
                let kept = std::sync::Arc::new(make());
                *slot = Some((key, kept.clone()));
                kept
            }
        }
    }
}

/// Input shapes a [`ShapeMemo`] keeps values for, as many as a tuner tunes; beyond them a value
/// is worked out afresh each run, so a graph fed ever-new shapes does not grow it.
const MEMO_SHAPES: usize = tune::SHAPES;

/// What an operator's shape-derived choices depend on, as a key: the compute pool's size
/// (which sizes per-thread scratch and splits), the vector instructions the kernels may use
/// (which decide the splits a block can take), then each operand's dtype, rank and dims (0
/// for an absent one).
pub(super) fn shape_key<'a>(operands: impl IntoIterator<Item = Option<&'a Tensor>>) -> Vec<usize> {
    let simd = usize::from(crate::nn::kernels::simd::fma()) | usize::from(crate::nn::kernels::simd::avx512()) << 1;
    let mut key = vec![rayon::current_num_threads(), simd];
    for t in operands {
        match t {
            None => key.push(0),
            Some(t) => {
                key.extend([1 + t.dtype() as usize, t.rank()]);
                key.extend_from_slice(t.dims());
            }
        }
    }
    key
}

/// What an operator works out from its inputs' shapes alone (the bytes it will allocate), kept
/// per shape. EfficientNet-Lite0's sixteen fused blocks planned every split of every
/// convolution again on each pass to bound it: 30 µs of a 2.5 ms batch-1 pass on the
/// thread that runs it, while the pool's other threads wait.
pub(super) struct ShapeMemo<V>(std::sync::Mutex<Vec<(Vec<usize>, V)>>);

impl<V> Default for ShapeMemo<V> {
    fn default() -> Self {
        ShapeMemo(std::sync::Mutex::new(Vec::new()))
    }
}

impl<V: Copy> ShapeMemo<V> {
    /// The value for `inputs`' [`shape_key`]: kept, or made by `make`. An error is not kept.
    pub(super) fn get(
        &self,
        inputs: &[Option<&Tensor>],
        make: impl FnOnce() -> Result<V, NnError>,
    ) -> Result<V, NnError> {
        let key = shape_key(inputs.iter().copied());
        // A poisoned lock only means a panic elsewhere between whole updates.
        let lock = || self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, v)) = lock().iter().find(|(k, _)| *k == key) {
            return Ok(*v);
        }
        // Made outside the lock: concurrent passes of the same model do not wait on each other.
        let value = make()?;
        let mut kept = lock();
        if kept.len() < MEMO_SHAPES && !kept.iter().any(|(k, _)| *k == key) {
            kept.push((key, value));
        }
        Ok(value)
    }

    /// Forgets every value (the operator changed what they depend on).
    pub(super) fn clear(&self) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }
}

/// Runs `f` on `t`'s f32 CPU storage as it lies, with the offset of `t`'s first element and its
/// strides (so a view out of a Transpose is read in place, not copied); `None` where `t` is not
/// an f32 tensor on the CPU.
fn with_f32_view<R>(t: &Tensor, f: impl FnOnce(&[f32], usize, &[usize]) -> R) -> Option<R> {
    use candle_core::{CpuStorage, Storage};
    if t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(v, layout.start_offset(), layout.stride())),
        _ => None,
    }
}

/// Runs `f` on the contiguous f32 contents of `t`: borrowed from its storage when it is a
/// contiguous f32 CPU tensor, copied otherwise.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, NnError> {
    use candle_core::{CpuStorage, Storage};
    if t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&v[a..b]));
        }
    }
    let owned = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&owned))
}

/// `len` zeroed floats, or `too-large` when the allocator cannot supply them: the meter bounds
/// `len` beforehand; this keeps a host short of memory from aborting on the allocation itself.
pub(super) fn zeros_f32(len: usize) -> Result<Vec<f32>, NnError> {
    let mut v = uninit_f32(len)?;
    v.resize(len, 0.0);
    Ok(v)
}

pub(super) use crate::nn::kernels::filled;

/// An empty vector with room for `len` floats (for a kernel that writes every one into its
/// spare capacity), or `too-large`, as [`zeros_f32`].
pub(super) fn uninit_f32(len: usize) -> Result<Vec<f32>, NnError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| NnError::too_large(format!("cannot allocate {len} floats")))?;
    Ok(v)
}

/// `a[m×k] · b[k×n]` on EIR's GEMM (`packed`: `a` packed) into a new vector, not zeroed first:
/// the GEMM writes every element.
pub(super) fn gemm_f32(
    dims: [usize; 3],
    a: &[f32],
    packed: Option<&crate::nn::kernels::sgemm::Packed>,
    b: &[f32],
) -> Result<Vec<f32>, NnError> {
    gemm_f32_with(dims, a, packed, b, None, false)
}

/// [`gemm_f32`] with a bias per row of the product (`m` values) and, where `gelu`, GELU after
/// it, both applied as each tile of the product is stored.
pub(super) fn gemm_f32_with(
    [m, n, k]: [usize; 3],
    a: &[f32],
    packed: Option<&crate::nn::kernels::sgemm::Packed>,
    b: &[f32],
    bias: Option<&[f32]>,
    gelu: bool,
) -> Result<Vec<f32>, NnError> {
    let len = m.checked_mul(n).ok_or_else(|| NnError::too_large("a product's size overflows"))?;
    let mut y = uninit_f32(len)?;
    crate::nn::kernels::sgemm::gemm_act_into([m, n, k], a, packed, b, &mut y.spare_capacity_mut()[..len], bias, gelu)?;
    // SAFETY: `gemm_act_into` returned Ok, so it wrote all `m·n` elements.
    unsafe { y.set_len(len) };
    Ok(y)
}

/// `a[m×k] · B` with `B` in strips and `bias` one value per column, GELU after it where
/// `gelu` ([`sgemm::gemm_strips`]), into a new vector, not zeroed first.
///
/// [`sgemm::gemm_strips`]: crate::nn::kernels::sgemm::gemm_strips
pub(super) fn gemm_strips_f32(
    m: usize,
    a: &[f32],
    b: &crate::nn::kernels::sgemm::Strips,
    bias: Option<&[f32]>,
    gelu: bool,
) -> Result<Vec<f32>, NnError> {
    let len = m.checked_mul(b.n()).ok_or_else(|| NnError::too_large("a product's size overflows"))?;
    let mut y = uninit_f32(len)?;
    crate::nn::kernels::sgemm::gemm_strips(m, a, b, &mut y.spare_capacity_mut()[..len], bias, gelu)?;
    // SAFETY: `gemm_strips` returned Ok, so it wrote all `m·n` elements.
    unsafe { y.set_len(len) };
    Ok(y)
}

/// Bytes a tensor's elements take (views count at their full logical size).
pub(super) fn tensor_bytes(t: &Tensor) -> Result<u64, NnError> {
    bytes_of(t.dims(), t.dtype().size_in_bytes(), &"a value")
}

/// Widest element any operator writes (f64, i64): bounds are stated at this width, so that a
/// cast or a float64 intermediate never exceeds them.
pub(super) const WIDE: u64 = 8;

/// The default [`Op::bound`]: every input element written twice more at [`WIDE`] bytes (the
/// output and one temporary), for operators whose outputs are no larger than their inputs.
fn inputs_bound(inputs: &[Option<&Tensor>]) -> Result<u64, NnError> {
    let elements = inputs
        .iter()
        .flatten()
        .try_fold(0u64, |acc, t| crate::nn::meter::elements(t.dims()).and_then(|n| acc.checked_add(n)).ok_or(()));
    let elements = elements.map_err(|()| NnError::too_large("the inputs' sizes overflow"))?;
    mul(elements, 2 * WIDE, &"the operator")
}

/// Bytes of `elements` values written `copies` times at [`WIDE`] bytes.
pub(super) fn wide(elements: u64, copies: u64) -> Result<u64, NnError> {
    mul(mul(elements, copies, &"the operator")?, WIDE, &"the operator")
}

/// Elements of a shape computed from a model's or request's numbers, checked.
pub(super) fn count(dims: &[usize]) -> Result<u64, NnError> {
    crate::nn::meter::elements(dims)
        .ok_or_else(|| NnError::too_large(format!("a tensor of shape {dims:?} does not fit in memory")))
}

/// A compiled operator.
/// An operator as [`std::any::Any`], so that the graph compiler can fuse known pairs.
pub(super) trait AsAny {
    /// `self` as `Any`.
    fn as_any(&self) -> &dyn std::any::Any;
    /// `self` as a boxed `Any`.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;
}

impl<T: std::any::Any> AsAny for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

pub(super) trait Op: AsAny + Send + Sync {
    /// Runs on `inputs` (`None` for an omitted optional input).
    fn run(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError>;

    /// The most bytes [`run`](Self::run) allocates on `inputs` (outputs and scratch), from their
    /// shapes (and small constant operands: shapes, repeats, pads) alone, with checked
    /// arithmetic; the executor reserves them before the operator runs. An operator whose
    /// output can outgrow its inputs (broadcasts, expands, products, padding) must override it.
    fn bound(&self, inputs: &[Option<&Tensor>]) -> Result<u64, NnError> {
        inputs_bound(inputs)
    }

    /// Takes over a clamp (Relu, Clip) applied to its only output; false if it cannot.
    fn fuse_clamp(&mut self, _clamp: Clamp) -> bool {
        false
    }

    /// Takes over an `Add` of its only output and another tensor, which the graph compiler
    /// then appends as its last input (a residual connection); false if it cannot.
    fn fuse_residual(&mut self) -> bool {
        false
    }

    /// Takes over an `Add` of its only output and a constant vector `bias` along its last axis
    /// (a dense layer's bias); false if it cannot.
    fn fuse_bias(&mut self, _bias: &[f32]) -> bool {
        false
    }

    /// Takes over an exact (erf) GELU of its only output; false if it cannot.
    fn fuse_gelu(&mut self) -> bool {
        false
    }

    /// Derives at load what it keeps from its constant inputs (`None`: not constant).
    fn prepare(&self, _constants: &[Option<&Tensor>]) {}

    /// At most what [`Op::prepare`] allocates for these constant inputs: charged to the load
    /// budget before it runs, so a model's derived weights cannot exceed the budget its own
    /// bytes set.
    fn prepared_bytes(&self, _constants: &[Option<&Tensor>]) -> Prepared {
        Prepared::default()
    }
}

/// Bytes [`Op::prepare`] allocates: what it keeps for the model's life, and what it holds only
/// while it runs (copies of a constant it reads).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Prepared {
    pub(crate) kept: u64,
    pub(crate) transient: u64,
}

impl Prepared {
    /// Both of `self` and `other`, made one after the other: kept bytes add up, transient ones
    /// do not outlive their maker.
    pub(crate) fn then(self, other: Prepared) -> Prepared {
        Prepared { kept: self.kept.saturating_add(other.kept), transient: self.transient.max(other.transient) }
    }
}

/// Bytes of `floats` f32 values, saturating (a bound, never a wrapped size).
pub(super) fn f32_bytes(floats: u64) -> u64 {
    floats.saturating_mul(4)
}

/// What an operator builder sees of its node.
pub(super) struct Node<'a> {
    pub proto: &'a NodeProto,
    pub opset: i64,
}

type Built = Result<Box<dyn Op>, NnError>;

/// Builds the operator for `node`, or says why it is not supported. `If` and `Constant` are
/// handled by the graph compiler.
pub(super) fn build(node: &Node<'_>) -> Built {
    let op = node.proto.op_type.as_str();
    if !node.proto.domain.is_empty() && node.proto.domain != "ai.onnx" {
        return Err(NnError::unsupported(format!(
            "operator {}::{op} (node `{}`): only the default ONNX domain is supported",
            node.proto.domain, node.proto.name
        )));
    }
    let built = elementwise::build(op, node)
        .or_else(|| nn::build(op, node))
        .or_else(|| shape::build(op, node))
        .or_else(|| reduce::build(op, node))
        .or_else(|| rnn::build(op, node))
        .unwrap_or_else(|| {
            Err(NnError::unsupported(format!("unsupported ONNX operator `{op}` (node `{}`)", node.proto.name)))
        })?;
    Ok(if FLOAT_ONLY.contains(&op) { Box::new(FloatOnly { op: built, name: op.to_string() }) } else { built })
}

/// A depthwise Conv (weights `w1`) and the pointwise Conv that alone reads its output
/// (weights `w2`) as one operator ([`nn::chain`]); otherwise both back as they were.
#[allow(clippy::type_complexity)]
pub(super) fn chain(
    first: Box<dyn Op>,
    w1: &[usize],
    second: Box<dyn Op>,
    w2: &[usize],
) -> Result<Box<dyn Op>, (Box<dyn Op>, Box<dyn Op>)> {
    // Both come wrapped as float-only operators (Conv is one).
    let convs = (*first).as_any().downcast_ref::<FloatOnly>().is_some_and(|f| f.name == "Conv")
        && (*second).as_any().downcast_ref::<FloatOnly>().is_some_and(|f| f.name == "Conv");
    if !convs {
        return Err((first, second));
    }
    let (Ok(a), Ok(b)) = (first.into_any().downcast::<FloatOnly>(), second.into_any().downcast::<FloatOnly>()) else {
        unreachable!("both were just checked to be float-only operators")
    };
    let (a, b) = (*a, *b);
    match nn::chain(a.op, w1, b.op, w2) {
        Ok(op) => Ok(Box::new(FloatOnly { op, name: a.name })),
        Err((x, y)) => Err((Box::new(FloatOnly { op: x, name: a.name }), Box::new(FloatOnly { op: y, name: b.name }))),
    }
}

/// Operators ONNX defines on floating-point tensors only (candle has no integer kernels for
/// them and would panic): an integer input is refused as ONNX Runtime refuses it.
const FLOAT_ONLY: &[&str] = &[
    "Sigmoid",
    "Tanh",
    "Erf",
    "Sqrt",
    "Exp",
    "Log",
    "Sin",
    "Cos",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Softplus",
    "Gelu",
    "LeakyRelu",
    "Elu",
    "HardSigmoid",
    "HardSwish",
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "BatchNormalization",
    "Conv",
    "Gemm",
    "MatMul",
    "AveragePool",
    "MaxPool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "LSTM",
    "Mean",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL2",
];

/// An operator of [`FLOAT_ONLY`]: its tensor inputs must be floats (LSTM's `sequence_lens`,
/// input 4, is an integer by definition).
struct FloatOnly {
    op: Box<dyn Op>,
    name: String,
}

impl FloatOnly {
    fn check(&self, inputs: &[Option<&Tensor>]) -> Result<(), NnError> {
        for (k, t) in inputs.iter().enumerate() {
            if let Some(t) = t
                && !t.dtype().is_float()
                && !(self.name == "LSTM" && k == 4)
            {
                return Err(NnError::invalid_argument(format!(
                    "{} takes floating-point tensors; input {k} is {:?}",
                    self.name,
                    t.dtype()
                )));
            }
        }
        Ok(())
    }
}

impl Op for FloatOnly {
    fn run(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        self.check(inputs)?;
        self.op.run(inputs)
    }

    fn bound(&self, inputs: &[Option<&Tensor>]) -> Result<u64, NnError> {
        self.check(inputs)?;
        self.op.bound(inputs)
    }

    fn fuse_clamp(&mut self, clamp: Clamp) -> bool {
        self.op.fuse_clamp(clamp)
    }

    fn fuse_residual(&mut self) -> bool {
        self.op.fuse_residual()
    }

    fn fuse_bias(&mut self, bias: &[f32]) -> bool {
        self.op.fuse_bias(bias)
    }

    fn fuse_gelu(&mut self) -> bool {
        self.op.fuse_gelu()
    }

    fn prepare(&self, constants: &[Option<&Tensor>]) {
        self.op.prepare(constants)
    }

    fn prepared_bytes(&self, constants: &[Option<&Tensor>]) -> Prepared {
        self.op.prepared_bytes(constants)
    }
}

impl Node<'_> {
    pub fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.proto.attribute.iter().find(|a| a.name == name)
    }

    fn bad(&self, what: impl std::fmt::Display) -> NnError {
        NnError::invalid_encoding(format!("{} node `{}`: {what}", self.proto.op_type, self.proto.name))
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        self.attr(name).filter(|a| a.r#type == AttributeType::Int as i32).map(|a| a.i)
    }

    pub fn int_or(&self, name: &str, default: i64) -> i64 {
        self.int(name).unwrap_or(default)
    }

    pub fn float_or(&self, name: &str, default: f32) -> f32 {
        self.attr(name).filter(|a| a.r#type == AttributeType::Float as i32).map(|a| a.f).unwrap_or(default)
    }

    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).filter(|a| a.r#type == AttributeType::Ints as i32).map(|a| a.ints.clone())
    }

    pub fn string(&self, name: &str) -> Option<String> {
        self.attr(name)
            .filter(|a| a.r#type == AttributeType::String as i32)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }

    pub fn strings(&self, name: &str) -> Option<Vec<String>> {
        self.attr(name)
            .filter(|a| a.r#type == AttributeType::Strings as i32)
            .map(|a| a.strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
    }

    pub fn tensor(&self, name: &str) -> Option<Result<Tensor, NnError>> {
        self.attr(name).filter(|a| a.r#type == AttributeType::Tensor as i32).and_then(|a| a.t.as_ref()).map(from_proto)
    }
}

/// The `i`-th input, required.
fn input<'a>(inputs: &[Option<&'a Tensor>], i: usize, op: &str) -> Result<&'a Tensor, NnError> {
    inputs.get(i).copied().flatten().ok_or_else(|| NnError::invalid_argument(format!("{op}: missing input {i}")))
}

/// Resolves a possibly negative axis against `rank`.
fn axis(a: i64, rank: usize) -> Result<usize, NnError> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    if a < 0 || a >= r.max(1) {
        return Err(NnError::invalid_argument(format!("axis {a} out of range for rank {rank}")));
    }
    Ok(a as usize)
}

/// Reads a small integer tensor (shapes, axes, pads) as i64 values.
fn i64s(t: &Tensor) -> Result<Vec<i64>, NnError> {
    Ok(t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?)
}

/// Reads a scalar as f64.
fn scalar_f64(t: &Tensor) -> Result<f64, NnError> {
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    v.first().copied().ok_or_else(|| NnError::invalid_argument("expected a scalar, got an empty tensor"))
}

/// A boxed operator from a closure, with the bound of its allocations.
struct FnOp<F, B> {
    run: F,
    bound: B,
}

impl<F, B> Op for FnOp<F, B>
where
    F: Fn(&[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> + Send + Sync + 'static,
    B: Fn(&[Option<&Tensor>]) -> Result<u64, NnError> + Send + Sync + 'static,
{
    fn run(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        (self.run)(inputs)
    }

    fn bound(&self, inputs: &[Option<&Tensor>]) -> Result<u64, NnError> {
        (self.bound)(inputs)
    }
}

/// An operator whose outputs are no larger than its inputs (see [`Op::bound`]'s default).
fn op(f: impl Fn(&[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> + Send + Sync + 'static) -> Built {
    Ok(Box::new(FnOp { run: f, bound: inputs_bound }))
}

/// An operator that allocates at most `bound(inputs)` bytes.
fn op_sized(
    bound: impl Fn(&[Option<&Tensor>]) -> Result<u64, NnError> + Send + Sync + 'static,
    f: impl Fn(&[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> + Send + Sync + 'static,
) -> Built {
    Ok(Box::new(FnOp { run: f, bound }))
}

#[cfg(test)]
mod memo_tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_shape_memo_keeps_one_value_per_shape_and_no_errors() {
        let memo = ShapeMemo::<u64>::default();
        let made = Cell::new(0);
        let make = |v: u64| {
            made.set(made.get() + 1);
            Ok(v)
        };
        let cpu = &candle_core::Device::Cpu;
        let a = Tensor::zeros((2, 3), DType::F32, cpu).unwrap();
        let b = Tensor::zeros((3, 2), DType::F32, cpu).unwrap();
        let a16 = Tensor::zeros((2, 3), DType::F16, cpu).unwrap();
        assert_eq!(memo.get(&[Some(&a), None], || make(1)).unwrap(), 1);
        // Same shapes: kept, not made again (even though `make` would now say otherwise).
        assert_eq!(memo.get(&[Some(&a), None], || make(9)).unwrap(), 1);
        assert_eq!(made.get(), 1);
        // Another dims, dtype, or a missing input where there was one: each made afresh.
        assert_eq!(memo.get(&[Some(&b), None], || make(2)).unwrap(), 2);
        assert_eq!(memo.get(&[Some(&a16), None], || make(3)).unwrap(), 3);
        assert_eq!(memo.get(&[None, Some(&a)], || make(4)).unwrap(), 4);
        assert_eq!(made.get(), 4);
        // An error is not kept: the next run works it out again.
        let err = memo.get(&[Some(&a), Some(&a)], || Err(NnError::runtime("no"))).unwrap_err();
        assert_eq!(err.message, "no");
        assert_eq!(memo.get(&[Some(&a), Some(&a)], || make(5)).unwrap(), 5);
        // Past MEMO_SHAPES shapes, new ones are made every time and not kept.
        for len in 10..10 + MEMO_SHAPES {
            let t = Tensor::zeros(len, DType::F32, cpu).unwrap();
            memo.get(&[Some(&t)], || make(len as u64)).unwrap();
        }
        let before = made.get();
        let late = Tensor::zeros(1000, DType::F32, cpu).unwrap();
        memo.get(&[Some(&late)], || make(7)).unwrap();
        memo.get(&[Some(&late)], || make(7)).unwrap();
        assert_eq!(made.get(), before + 2);
        assert!(memo.0.lock().unwrap().len() <= MEMO_SHAPES);
        memo.clear();
        assert_eq!(memo.get(&[Some(&a), None], || make(8)).unwrap(), 8);
        // The kernels' instructions are part of the key: a block bounded with AVX-512 splits
        // is bounded again where they are capped away (tests cap them; a run never does).
        if crate::nn::kernels::simd::avx512() {
            let _cap = simd_cap(crate::nn::kernels::simd::Level::Portable);
            assert_eq!(memo.get(&[Some(&a), None], || make(11)).unwrap(), 11);
        }
    }
}
