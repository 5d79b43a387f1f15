//! Compiling an ONNX graph once, at load: names resolved to constant or value slots, nodes in
//! topological order, initializers converted once, constants folded (including `If` on a
//! constant condition), Conv+BatchNormalization and zero-Pad+Conv fused, and each value freed
//! right after its last consumer. Running is then a walk over the compiled steps.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Tensor};

use super::ops::{self, Clamp, Node, Op, constant_value, tensor_bytes};
use super::proto::{GraphProto, NodeProto, ValueInfoProto};
use super::tensor::{dtype_of, from_proto};
use crate::nn::error::NnError;
use crate::nn::meter::{Charge, Meter};

/// Where a value lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Src {
    /// A constant (initializer, Constant node or folded result), shared by every run.
    Const(usize),
    /// A per-run value slot.
    Slot(usize),
}

enum Kind {
    Op(Box<dyn Op>),
    If { then_block: Block, else_block: Block },
}

struct Step {
    kind: Kind,
    /// The operator of the node that made it (steps fused into it keep it).
    op: String,
    name: String,
    inputs: Vec<Option<Src>>,
    outputs: Vec<usize>,
    /// Slots whose last reader is this step.
    free: Vec<usize>,
}

/// A sequence of steps and the values it yields (a graph's or a branch's outputs).
pub(super) struct Block {
    steps: Vec<Step>,
    outputs: Vec<Src>,
}

/// Declared dimensions (`None` for symbolic ones).
type DeclaredShape = Vec<Option<usize>>;

/// A declared graph input.
pub(super) struct InputSpec {
    pub name: String,
    pub slot: usize,
    pub dtype: DType,
    /// Fixed dimensions (`None` for symbolic ones); `None` when the rank is not declared.
    pub shape: Option<DeclaredShape>,
}

/// A compiled model.
pub(super) struct Program {
    consts: Vec<Tensor>,
    slots: usize,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<(String, Src)>,
    /// Each output's declared dimensions (`None` where the graph declares none).
    pub output_shapes: Vec<Option<DeclaredShape>>,
    body: Block,
}

struct Compiler<'m> {
    consts: Vec<Tensor>,
    slots: usize,
    opset: i64,
    unsupported: Vec<String>,
    /// The load budget: every constant (initializers, folded values) is charged to it.
    meter: &'m Meter,
    /// Nodes compiled so far, all subgraphs included.
    nodes: usize,
}

/// Names visible while compiling a (sub)graph: its own, then its parents'.
struct Scope<'p> {
    names: HashMap<String, Src>,
    parent: Option<&'p Scope<'p>>,
}

impl Scope<'_> {
    fn get(&self, name: &str) -> Option<Src> {
        self.names.get(name).copied().or_else(|| self.parent.and_then(|p| p.get(name)))
    }
}

/// Most nested `If` levels accepted (a hostile model could nest without end). Protobuf
/// nesting itself is bounded by prost's decoder (100 levels).
const MAX_DEPTH: usize = 32;
/// Most nodes a model may have, subgraphs included (the largest real exports have ~10^5).
pub(super) const MAX_NODES: usize = 1 << 20;

/// The values of one run: a slot per value, and what each holds of the compute's budget.
struct Env<'m> {
    values: Vec<Option<Tensor>>,
    charges: Vec<Option<Charge<'m>>>,
}

impl<'m> Env<'m> {
    fn set(&mut self, slot: usize, value: Tensor, charge: Charge<'m>) {
        self.values[slot] = Some(value);
        self.charges[slot] = Some(charge);
    }

    fn free(&mut self, slot: usize) {
        self.values[slot] = None;
        self.charges[slot] = None;
    }
}

impl Program {
    /// Compiles the main graph of a model with default-domain opset `opset`, charging every
    /// constant it keeps (and every folding step) to `meter`, the load budget.
    pub fn compile(graph: &GraphProto, opset: i64, meter: &Meter) -> Result<Self, NnError> {
        let mut c = Compiler { consts: Vec::new(), slots: 0, opset, unsupported: Vec::new(), meter, nodes: 0 };
        let mut scope = Scope { names: HashMap::new(), parent: None };
        let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let mut inputs = Vec::new();
        for vi in &graph.input {
            if initializers.contains(vi.name.as_str()) {
                continue;
            }
            let slot = c.slot();
            let (dtype, shape) = value_type(vi)?;
            scope.names.insert(vi.name.clone(), Src::Slot(slot));
            inputs.push(InputSpec { name: vi.name.clone(), slot, dtype, shape });
        }
        let mut steps = Vec::new();
        let outputs = c.graph(graph, &mut scope, &mut steps, 0)?;
        if !c.unsupported.is_empty() {
            let mut counts: Vec<(String, usize)> = Vec::new();
            for op in &c.unsupported {
                match counts.iter_mut().find(|(o, _)| o == op) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((op.clone(), 1)),
                }
            }
            let list: Vec<String> =
                counts.iter().map(|(o, n)| format!("{o} ({n} node{})", if *n > 1 { "s" } else { "" })).collect();
            return Err(NnError::unsupported(format!(
                "the model uses operators EIR does not support: {}",
                list.join(", ")
            )));
        }
        let outputs: Vec<(String, Src)> = graph.output.iter().map(|o| o.name.clone()).zip(outputs).collect();
        let mut body = Block { steps, outputs: outputs.iter().map(|(_, s)| *s).collect() };
        let input_slots: HashSet<usize> = inputs.iter().map(|i| i.slot).collect();
        fuse_conv_chains(&mut body, &c.consts);
        fuse_residual_adds(&mut body);
        plan_frees(&mut body, &input_slots);
        // What the operators derive from their constants (packed weights) is kept beside them
        // for the model's life: charged to the load budget before it is made, with room for the
        // largest copy one of them makes on the way.
        let prepared = prepared_bytes(&body, &c.consts);
        let kept = c.meter.reserve(prepared.kept, &"the operators' packed weights")?;
        let transient = c.meter.reserve(prepared.transient, &"a constant read for packing")?;
        prepare(&body, &c.consts);
        drop(transient);
        kept.keep();
        let output_shapes = graph.output.iter().map(|o| value_type(o).ok().and_then(|(_, shape)| shape)).collect();
        Ok(Self { consts: c.consts, slots: c.slots, inputs, outputs, output_shapes, body })
    }

    /// Number of compiled steps (for logs).
    pub fn steps(&self) -> usize {
        fn count(b: &Block) -> usize {
            b.steps
                .iter()
                .map(|s| match &s.kind {
                    Kind::Op(_) => 1,
                    Kind::If { then_block, else_block } => 1 + count(then_block) + count(else_block),
                })
                .sum()
        }
        count(&self.body)
    }

    /// Number of constants held.
    pub fn constants(&self) -> usize {
        self.consts.len()
    }

    /// Runs the program with the given input values (by input index) under `meter`: before
    /// each operator runs, what it will allocate ([`Op::bound`], from the real input shapes) is
    /// reserved on the meter, and each value holds its bytes until its last reader is done.
    /// Between operators the meter's deadline and cancellation are checked. With
    /// `EIR_ONNX_PROFILE=1` in the environment, logs where the time went, by operator
    /// (`EIR_ONNX_PROFILE=nodes`: by node, fused steps under their last node's name).
    pub fn run(&self, inputs: Vec<Tensor>, meter: &Meter) -> Result<Vec<Tensor>, NnError> {
        let mut env = Env { values: vec![None; self.slots], charges: (0..self.slots).map(|_| None).collect() };
        for (spec, value) in self.inputs.iter().zip(inputs) {
            let charge = meter.reserve(tensor_bytes(&value)?, &format!("input `{}`", spec.name))?;
            env.set(spec.slot, value, charge);
        }
        let mut profile = (profiling() != Profiling::Off).then(HashMap::new);
        let started = std::time::Instant::now();
        let values = self.exec(&self.body, &mut env, meter, &mut profile)?;
        if let Some(p) = profile {
            let mut rows: Vec<(String, (std::time::Duration, usize))> = p.into_iter().collect();
            rows.sort_by_key(|r| std::cmp::Reverse(r.1.0));
            let total: std::time::Duration = rows.iter().map(|r| r.1.0).sum();
            let summary: Vec<String> =
                rows.iter().map(|(op, (t, n))| format!("{op} {:.3}ms/{n}", t.as_secs_f64() * 1e3)).collect();
            tracing::info!(
                total_ms = total.as_secs_f64() * 1e3,
                wall_ms = started.elapsed().as_secs_f64() * 1e3,
                "ONNX profile: {}",
                summary.join(", ")
            );
        }
        Ok(values)
    }

    fn value<'a>(&'a self, env: &'a [Option<Tensor>], src: Src, step: &str) -> Result<&'a Tensor, NnError> {
        match src {
            Src::Const(i) => {
                self.consts.get(i).ok_or_else(|| NnError::runtime(format!("node `{step}` reads a missing constant")))
            }
            Src::Slot(s) => env
                .get(s)
                .and_then(Option::as_ref)
                .ok_or_else(|| NnError::runtime(format!("node `{step}` reads a value that was not computed"))),
        }
    }

    fn exec<'m>(
        &self,
        block: &Block,
        env: &mut Env<'m>,
        meter: &'m Meter,
        profile: &mut Profile,
    ) -> Result<Vec<Tensor>, NnError> {
        for step in &block.steps {
            let at = NodeAt(&step.name);
            meter.checkpoint(&at)?;
            let started = profile.is_some().then(std::time::Instant::now);
            let outs = match &step.kind {
                Kind::Op(op) => {
                    let ins = step
                        .inputs
                        .iter()
                        .map(|s| s.map(|s| self.value(&env.values, s, &step.name)).transpose())
                        .collect::<Result<Vec<_>, _>>()?;
                    run_op(op.as_ref(), &ins, meter, &at)?
                }
                Kind::If { then_block, else_block } => {
                    let cond = match step.inputs.first().copied().flatten() {
                        Some(src) => truthy(self.value(&env.values, src, &step.name)?)?,
                        None => {
                            return Err(NnError::invalid_argument(format!("If `{}` without a condition", step.name)));
                        }
                    };
                    self.exec(if cond { then_block } else { else_block }, env, meter, profile)?
                }
            };
            if outs.len() < step.outputs.len() {
                return Err(NnError::runtime(format!(
                    "node `{}` produced {} of {} outputs",
                    step.name,
                    outs.len(),
                    step.outputs.len()
                )));
            }
            for (slot, value) in step.outputs.iter().zip(outs) {
                let charge = meter.reserve(tensor_bytes(&value)?, &at)?;
                env.set(*slot, value, charge);
            }
            if let (Some(p), Some(t), Kind::Op(_)) = (profile.as_mut(), started, &step.kind) {
                let key = if profiling() == Profiling::Nodes { &step.name } else { step.name_op() };
                let e = p.entry(key.to_string()).or_default();
                e.0 += t.elapsed();
                e.1 += 1;
            }
            for &slot in &step.free {
                env.free(slot);
            }
        }
        block.outputs.iter().map(|&src| self.value(&env.values, src, "output").cloned()).collect()
    }
}

/// "node `name`", formatted only when a message needs it.
struct NodeAt<'a>(&'a str);

impl std::fmt::Display for NodeAt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node `{}`", self.0)
    }
}

/// Runs `op` with what it will allocate reserved on `meter` first. Its outputs are then
/// charged by the caller at their real size; an operator whose outputs exceed what it declared
/// is a bug in its [`Op::bound`] (a panic in tests and under the fuzzer, an error in debug
/// builds, a warning otherwise).
fn run_op(
    op: &dyn Op,
    ins: &[Option<&Tensor>],
    meter: &Meter,
    at: &dyn std::fmt::Display,
) -> Result<Vec<Tensor>, NnError> {
    let named = |e: NnError| NnError { message: format!("{at}: {}", e.message), ..e };
    let bound = op.bound(ins).map_err(named)?;
    let scratch = meter.reserve(bound, at)?;
    let outs = op.run(ins).map_err(named)?;
    drop(scratch);
    let made = outs.iter().try_fold(0u64, |acc, t| Ok::<_, NnError>(acc.saturating_add(tensor_bytes(t)?)))?;
    if made > bound {
        let message = format!("{at}: produced {made} bytes but declared at most {bound}");
        // Under the fuzzer and in tests an under-declared bound is a finding, not just an error.
        if cfg!(any(fuzzing, test)) {
            panic!("{message}");
        }
        if cfg!(debug_assertions) {
            return Err(NnError::runtime(format!("internal: {message}")));
        }
        tracing::warn!("{message}");
    }
    Ok(outs)
}

/// Time and count per operator, when profiling.
type Profile = Option<HashMap<String, (std::time::Duration, usize)>>;

/// What `EIR_ONNX_PROFILE` asks for: `1` times by operator type, `nodes` by node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Profiling {
    Off,
    Ops,
    Nodes,
}

fn profiling() -> Profiling {
    static ON: std::sync::OnceLock<Profiling> = std::sync::OnceLock::new();
    *ON.get_or_init(|| match std::env::var("EIR_ONNX_PROFILE").as_deref() {
        Ok("1") => Profiling::Ops,
        Ok("nodes") => Profiling::Nodes,
        _ => Profiling::Off,
    })
}

fn truthy(t: &Tensor) -> Result<bool, NnError> {
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(v.first().is_some_and(|&x| x != 0.0))
}

/// The element type and declared shape of a graph input.
fn value_type(vi: &ValueInfoProto) -> Result<(DType, Option<DeclaredShape>), NnError> {
    use super::proto::type_proto::Value;
    let tensor = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(Value::TensorType(t)) => t,
        _ => return Err(NnError::unsupported(format!("input `{}` is not a tensor", vi.name))),
    };
    let dtype = dtype_of(tensor.elem_type)?;
    let shape = tensor.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match d.value {
                Some(super::proto::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => Some(v as usize),
                _ => None,
            })
            .collect()
    });
    Ok((dtype, shape))
}

impl Compiler<'_> {
    fn slot(&mut self) -> usize {
        self.slots += 1;
        self.slots - 1
    }

    /// Keeps `t` as a constant, charged to the load budget for the model's life.
    fn constant(&mut self, t: Tensor, what: &dyn std::fmt::Display) -> Result<Src, NnError> {
        self.meter.reserve(tensor_bytes(&t)?, what)?.keep();
        self.consts.push(t);
        Ok(Src::Const(self.consts.len() - 1))
    }

    fn const_value(&self, src: Option<Src>) -> Option<&Tensor> {
        match src {
            Some(Src::Const(i)) => Some(&self.consts[i]),
            _ => None,
        }
    }

    /// Compiles `g`'s nodes into `steps`, returning where its outputs are.
    fn graph(
        &mut self,
        g: &GraphProto,
        scope: &mut Scope<'_>,
        steps: &mut Vec<Step>,
        depth: usize,
    ) -> Result<Vec<Src>, NnError> {
        if depth > MAX_DEPTH {
            return Err(NnError::invalid_encoding(format!("If branches nested more than {MAX_DEPTH} deep")));
        }
        self.nodes = self.nodes.saturating_add(g.node.len());
        if self.nodes > MAX_NODES {
            return Err(NnError::too_large(format!("the model has more than {MAX_NODES} nodes")));
        }
        self.meter.checkpoint(&"its initializers")?;
        for init in &g.initializer {
            let t = from_proto(init)?;
            let src = self.constant(t, &format!("initializer `{}`", init.name))?;
            scope.names.insert(init.name.clone(), src);
        }
        let sorted;
        let g = if is_topological(g, scope) {
            g
        } else {
            sorted = topological(g, scope)?;
            &sorted
        };
        let mut consumers = consumer_counts(g);
        let pad_folds = self.pad_folds(g, scope, &consumers);
        let (gelu_folds, attention_folds) = {
            let nodes = Nodes::new(g, &consumers);
            (self.gelu_folds(&nodes, scope), self.attention_folds(&nodes, scope))
        };
        let folded: HashSet<usize> = gelu_folds
            .values()
            .flat_map(|f| f.nodes)
            .chain(attention_folds.values().flat_map(|f| f.nodes.iter().copied()))
            .collect();
        for fold in gelu_folds.values() {
            // `y`'s two readers in the decomposition become the one Gelu.
            if let Some(n) = consumers.get_mut(fold.input.as_str()) {
                *n -= 1;
            }
        }
        // Producer step of each value name in this block, for fusing BatchNormalization.
        let mut producer: HashMap<String, usize> = HashMap::new();

        for (k, node) in g.node.iter().enumerate() {
            if pad_folds.values().any(|f| f.pad_node == k) || folded.contains(&k) {
                continue; // folded into its Conv, a Gelu or an attention step
            }
            if let Some(fold) = attention_folds.get(&k) {
                let inputs = fold
                    .inputs
                    .iter()
                    .map(|name| {
                        scope.get(name).map(Some).ok_or_else(|| {
                            NnError::invalid_encoding(format!(
                                "node `{}` uses `{name}` before it is defined",
                                node.name
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let outputs: Vec<usize> = node.output.iter().map(|_| self.slot()).collect();
                for (name, &slot) in node.output.iter().zip(&outputs) {
                    scope.names.insert(name.clone(), Src::Slot(slot));
                    producer.insert(name.clone(), steps.len());
                }
                steps.push(Step {
                    kind: Kind::Op(ops::attention(fold.scale, fold.inputs.len() == 4)),
                    op: "Attention".into(),
                    name: fold.name.clone(),
                    inputs,
                    outputs,
                    free: Vec::new(),
                });
                continue;
            }
            let mut node_owned;
            let mut node = node;
            if let Some(fold) = pad_folds.get(&k) {
                node_owned = node.clone();
                fold.apply(&mut node_owned);
                node = &node_owned;
            }
            if let Some(fold) = gelu_folds.get(&k) {
                node_owned = NodeProto {
                    op_type: "Gelu".into(),
                    name: node.name.clone(),
                    input: vec![fold.input.clone()],
                    output: node.output.clone(),
                    ..Default::default()
                };
                node = &node_owned;
            }
            let inputs = node
                .input
                .iter()
                .map(|name| {
                    if name.is_empty() {
                        Ok(None)
                    } else {
                        scope.get(name).map(Some).ok_or_else(|| {
                            NnError::invalid_encoding(format!(
                                "node `{}` ({}) uses `{name}` before it is defined",
                                node.name, node.op_type
                            ))
                        })
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            let view = Node { proto: node, opset: self.opset };
            match node.op_type.as_str() {
                "Constant" => {
                    let src = self.constant(constant_value(&view)?, &format!("Constant `{}`", node.name))?;
                    if let Some(out) = node.output.first() {
                        scope.names.insert(out.clone(), src);
                    }
                }
                "If" => self.if_node(node, &inputs, scope, steps, depth)?,
                "Relu" | "Clip" | "BatchNormalization" | "Add" | "Gelu"
                    if let Some(idx) = self.fusing_into(node, &inputs, &producer, &consumers)
                        && self.fuse_into(node, &inputs, &mut steps[idx])? =>
                {
                    // The producing step now computes this node's output too.
                    if let (Some(out), Some(&slot)) = (node.output.first(), steps[idx].outputs.first()) {
                        scope.names.insert(out.clone(), Src::Slot(slot));
                        producer.insert(out.clone(), idx);
                    }
                }
                _ => {
                    let op = match ops::build(&view) {
                        Ok(op) => op,
                        Err(e) if e.code == crate::nn::bindings::errors::ErrorCode::UnsupportedOperation => {
                            self.unsupported.push(node.op_type.clone());
                            for out in &node.output {
                                let slot = self.slot();
                                scope.names.insert(out.clone(), Src::Slot(slot));
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let all_const = inputs.iter().all(|s| matches!(s, None | Some(Src::Const(_))));
                    if all_const && !inputs.is_empty() {
                        // Constant folding: run it now, once, under the load budget.
                        let at = format!("folding node `{}` ({})", node.name, node.op_type);
                        self.meter.checkpoint(&at)?;
                        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|s| self.const_value(*s)).collect();
                        let outs = run_op(op.as_ref(), &ins, self.meter, &at)?;
                        for (name, value) in node.output.iter().zip(outs) {
                            if !name.is_empty() {
                                let src = self.constant(value, &at)?;
                                scope.names.insert(name.clone(), src);
                            }
                        }
                        continue;
                    }
                    let outputs: Vec<usize> = node.output.iter().map(|_| self.slot()).collect();
                    for (name, &slot) in node.output.iter().zip(&outputs) {
                        if !name.is_empty() {
                            scope.names.insert(name.clone(), Src::Slot(slot));
                            producer.insert(name.clone(), steps.len());
                        }
                    }
                    steps.push(Step {
                        kind: Kind::Op(op),
                        op: node.op_type.clone(),
                        name: step_name(node),
                        inputs,
                        outputs,
                        free: Vec::new(),
                    });
                }
            }
        }
        g.output
            .iter()
            .map(|o| {
                scope
                    .get(&o.name)
                    .ok_or_else(|| NnError::invalid_encoding(format!("graph output `{}` is never produced", o.name)))
            })
            .collect()
    }

    fn if_node(
        &mut self,
        node: &NodeProto,
        inputs: &[Option<Src>],
        scope: &mut Scope<'_>,
        steps: &mut Vec<Step>,
        depth: usize,
    ) -> Result<(), NnError> {
        let branch = |name: &str| {
            node.attribute
                .iter()
                .find(|a| a.name == name)
                .and_then(|a| a.g.as_ref())
                .ok_or_else(|| NnError::invalid_encoding(format!("If `{}` has no {name}", node.name)))
        };
        let (then_g, else_g) = (branch("then_branch")?, branch("else_branch")?);
        let cond = inputs.first().copied().flatten();
        if let Some(c) = self.const_value(cond) {
            // A constant condition: inline the chosen branch.
            let chosen = if truthy(c)? { then_g } else { else_g };
            let outs = {
                let mut child = Scope { names: HashMap::new(), parent: Some(scope) };
                self.graph(chosen, &mut child, steps, depth + 1)?
            };
            for (name, src) in node.output.iter().zip(outs) {
                scope.names.insert(name.clone(), src);
            }
            return Ok(());
        }
        let mut compile = |g: &GraphProto| -> Result<Block, NnError> {
            let mut child = Scope { names: HashMap::new(), parent: Some(scope) };
            let mut branch_steps = Vec::new();
            let outputs = self.graph(g, &mut child, &mut branch_steps, depth + 1)?;
            Ok(Block { steps: branch_steps, outputs })
        };
        let then_block = compile(then_g)?;
        let else_block = compile(else_g)?;
        if then_block.outputs.len() != node.output.len() || else_block.outputs.len() != node.output.len() {
            return Err(NnError::invalid_encoding(format!(
                "If `{}`: branch outputs do not match the node's",
                node.name
            )));
        }
        let outputs: Vec<usize> = node.output.iter().map(|_| self.slot()).collect();
        for (name, &slot) in node.output.iter().zip(&outputs) {
            scope.names.insert(name.clone(), Src::Slot(slot));
        }
        steps.push(Step {
            kind: Kind::If { then_block, else_block },
            op: node.op_type.clone(),
            name: step_name(node),
            inputs: inputs.to_vec(),
            outputs,
            free: Vec::new(),
        });
        Ok(())
    }

    /// The step `node` may fuse into: the producer of its first input, where `node` is that
    /// value's only reader (for an `Add` of a constant, the producer of its other operand).
    fn fusing_into(
        &self,
        node: &NodeProto,
        inputs: &[Option<Src>],
        producer: &HashMap<String, usize>,
        consumers: &HashMap<&str, usize>,
    ) -> Option<usize> {
        let operand = match inputs {
            [Some(first), Some(_)] if node.op_type == "Add" && self.const_value(Some(*first)).is_some() => 1,
            _ => 0,
        };
        let input = node.input.get(operand)?;
        let &idx = producer.get(input)?;
        (consumers.get(input.as_str()) == Some(&1) && node.output.len() == 1).then_some(idx)
    }

    /// Moves a Relu or a Clip with constant bounds into the step that feeds only it (a
    /// convolution applies it while writing its output).
    fn fuse_clamp(&mut self, node: &NodeProto, inputs: &[Option<Src>], step: &mut Step) -> Result<bool, NnError> {
        let clamp = if node.op_type == "Relu" {
            Clamp { lo: 0.0, hi: f32::INFINITY }
        } else {
            let bound = |i: usize, attr: &str, default: f32| -> Option<f32> {
                match inputs.get(i).copied().flatten() {
                    Some(src) => self.const_value(Some(src)).and_then(|t| {
                        t.to_dtype(DType::F32).ok()?.flatten_all().ok()?.to_vec1::<f32>().ok()?.first().copied()
                    }),
                    None => Some(node.attribute.iter().find(|a| a.name == attr).map(|a| a.f).unwrap_or(default)),
                }
            };
            match (bound(1, "min", f32::NEG_INFINITY), bound(2, "max", f32::INFINITY)) {
                (Some(lo), Some(hi)) => Clamp { lo, hi },
                _ => return Ok(false),
            }
        };
        let Kind::Op(op) = &mut step.kind else { return Ok(false) };
        if !op.fuse_clamp(clamp) {
            return Ok(false);
        }
        step.name = format!("{}+{}", step.name, step_name(node));
        Ok(true)
    }

    /// Fuses `node` (an activation, a batch norm or a bias) into the step producing its input.
    fn fuse_into(&mut self, node: &NodeProto, inputs: &[Option<Src>], step: &mut Step) -> Result<bool, NnError> {
        let Kind::Op(op) = &mut step.kind else { return Ok(false) };
        let fused = match node.op_type.as_str() {
            "BatchNormalization" => return self.fold_batch_norm(node, inputs, step),
            "Add" => {
                // A constant f32 vector as either operand: a dense layer's bias.
                let bias = inputs
                    .iter()
                    .find_map(|&i| self.const_value(i))
                    .filter(|b| b.rank() == 1 && b.dtype() == DType::F32 && inputs.len() == 2);
                match bias.and_then(|b| b.to_vec1::<f32>().ok()) {
                    Some(bias) => op.fuse_bias(&bias),
                    None => false,
                }
            }
            "Gelu" => {
                let exact = node.attribute.iter().find(|a| a.name == "approximate").is_none_or(|a| a.s == b"none");
                exact && op.fuse_gelu()
            }
            _ => return self.fuse_clamp(node, inputs, step),
        };
        if fused {
            step.name = format!("{}+{}", step.name, step_name(node));
        }
        Ok(fused)
    }

    /// Folds an inference BatchNormalization into the Conv that feeds only it:
    /// `W' = W * a`, `b' = (b - mean) * a + beta` with `a = gamma / sqrt(var + eps)`.
    fn fold_batch_norm(&mut self, node: &NodeProto, inputs: &[Option<Src>], step: &mut Step) -> Result<bool, NnError> {
        if step.name_op() != "Conv" {
            return Ok(false);
        }
        let params: Vec<&Tensor> = inputs.iter().skip(1).filter_map(|s| self.const_value(*s)).collect();
        let weight = self.const_value(step.inputs.get(1).copied().flatten());
        let (Some(weight), [gamma, beta, mean, var]) = (weight, params.as_slice()) else { return Ok(false) };
        if weight.dtype() != DType::F32 {
            return Ok(false);
        }
        let eps = node.attribute.iter().find(|a| a.name == "epsilon").map(|a| f64::from(a.f)).unwrap_or(1e-5);
        let a = gamma.broadcast_div(&(*var + eps)?.sqrt()?)?;
        let c_out = weight.dims()[0];
        if a.elem_count() != c_out {
            return Ok(false);
        }
        let mut wdims = vec![1usize; weight.rank()];
        wdims[0] = c_out;
        let new_w = weight.broadcast_mul(&a.reshape(wdims)?)?;
        let bias = match self.const_value(step.inputs.get(2).copied().flatten()) {
            Some(b) => b.clone(),
            None if step.inputs.get(2).copied().flatten().is_some() => return Ok(false),
            None => Tensor::zeros(c_out, DType::F32, weight.device())?,
        };
        let new_b = ((bias - *mean)?.broadcast_mul(&a)? + *beta)?;
        let at = format!("folding BatchNormalization `{}`", node.name);
        let (w_src, b_src) = (self.constant(new_w, &at)?, self.constant(new_b, &at)?);
        step.inputs.resize(3, None);
        step.inputs[1] = Some(w_src);
        step.inputs[2] = Some(b_src);
        step.name = format!("{}+{}", step.name, step_name(node));
        Ok(true)
    }

    /// Zero `Pad`s over spatial axes whose only consumer is a `Conv`: the Conv pads instead
    /// (the direct kernels read padding for free). Keyed by the Conv's node index.
    fn pad_folds(
        &self,
        g: &GraphProto,
        scope: &Scope<'_>,
        consumers: &HashMap<&str, usize>,
    ) -> HashMap<usize, PadFold> {
        let mut folds = HashMap::new();
        for (k, pad) in g.node.iter().enumerate() {
            if pad.op_type != "Pad" || pad.output.len() != 1 || consumers.get(pad.output[0].as_str()) != Some(&1) {
                continue;
            }
            let mode = pad.attribute.iter().find(|a| a.name == "mode").map(|a| a.s.as_slice()).unwrap_or(b"constant");
            if mode != b"constant" {
                continue;
            }
            let constant =
                |i: usize| pad.input.get(i).filter(|n| !n.is_empty()).map(|n| self.const_value(scope.get(n)));
            let pads = match constant(1) {
                Some(Some(t)) => t.to_dtype(DType::I64).and_then(|t| t.to_vec1::<i64>()).ok(),
                _ => pad.attribute.iter().find(|a| a.name == "pads").map(|a| a.ints.clone()),
            };
            let zero = match constant(2) {
                None => true,
                Some(Some(v)) => v
                    .flatten_all()
                    .and_then(|v| v.to_dtype(DType::F64))
                    .and_then(|v| v.to_vec1::<f64>())
                    .is_ok_and(|v| v.iter().all(|&x| x == 0.0)),
                Some(None) => false,
            };
            if !zero || pad.input.get(3).is_some_and(|a| !a.is_empty()) {
                continue;
            }
            let Some(pads) = pads else { continue };
            let Some((c, conv)) = g.node.iter().enumerate().find(|(_, n)| n.input.first() == Some(&pad.output[0]))
            else {
                continue;
            };
            let rank = pads.len() / 2;
            let spatial_only = rank >= 3 && pads[..2].iter().chain(&pads[rank..rank + 2]).all(|&p| p == 0);
            let conv_ok = conv.op_type == "Conv"
                && conv.attribute.iter().all(|a| a.name != "auto_pad" || a.s == b"NOTSET")
                && pads.iter().all(|&p| p >= 0);
            if spatial_only && conv_ok {
                let spatial = rank - 2;
                let begin = pads[2..rank].to_vec();
                let end = pads[rank + 2..].to_vec();
                debug_assert_eq!(begin.len(), spatial);
                folds.insert(c, PadFold { pad_node: k, input: pad.input[0].clone(), begin, end });
            }
        }
        folds
    }
}

/// A block's nodes by the value each makes, with each value's readers: what the pattern folds
/// (GELU, attention) walk.
struct Nodes<'g, 'c> {
    g: &'g GraphProto,
    made_by: HashMap<&'g str, usize>,
    consumers: &'c HashMap<&'g str, usize>,
}

impl<'g, 'c> Nodes<'g, 'c> {
    fn new(g: &'g GraphProto, consumers: &'c HashMap<&'g str, usize>) -> Self {
        let made_by =
            g.node.iter().enumerate().flat_map(|(k, n)| n.output.iter().map(move |o| (o.as_str(), k))).collect();
        Nodes { g, made_by, consumers }
    }

    /// Whether `n` is an `op` of the standard domain with `inputs` inputs and one output.
    fn is(n: &NodeProto, op: &str, inputs: usize) -> bool {
        n.op_type == op
            && (n.domain.is_empty() || n.domain == "ai.onnx")
            && n.input.len() == inputs
            && n.output.len() == 1
    }

    /// The node making `name` (and its index), if it [`is`](Self::is) an `op` of `inputs`
    /// inputs and no other node reads `name`.
    fn only(&self, name: &str, op: &str, inputs: usize) -> Option<(usize, &'g NodeProto)> {
        let k = *self.made_by.get(name)?;
        let n = &self.g.node[k];
        (Self::is(n, op, inputs) && self.consumers.get(name) == Some(&1)).then_some((k, n))
    }
}

impl Compiler<'_> {
    /// A constant of one value that broadcasts without changing a shape (rank 0 or `[1]`): the
    /// value as f32, and the constant's own type.
    fn one_value(&self, scope: &Scope<'_>, name: &str) -> Option<(f32, DType)> {
        let t = self.const_value(scope.get(name))?;
        if t.elem_count() != 1 || t.rank() > 1 {
            return None;
        }
        let v = t.to_dtype(DType::F32).ok()?.flatten_all().ok()?.to_vec1::<f32>().ok()?.first().copied()?;
        Some((v, t.dtype()))
    }
}

/// Scaled, masked attention written out as exporters do: the nodes it replaces (all but the last
/// `MatMul`, whose place the fused step takes), its inputs (`Q`, `Kᵀ`, `V`, the mask if any)
/// and its scale.
struct AttentionFold {
    nodes: Vec<usize>,
    inputs: Vec<String>,
    scale: Option<(f32, bool)>,
    name: String,
}

impl Compiler<'_> {
    /// `MatMul(Softmax(Add(Mul(MatMul(Q, Kᵀ), c), mask)), V)` among `g`'s nodes, keyed by the last
    /// MatMul ([`ops::attention`]): the scale a `Mul` by a constant (either operand) or a `Div`
    /// by one, or none; the mask either operand of the `Add`, or none; the softmax over the last
    /// axis (`axis` -1, or opset 13's default). Every value inside must have no other reader.
    fn attention_folds(&self, nodes: &Nodes<'_, '_>, scope: &Scope<'_>) -> HashMap<usize, AttentionFold> {
        let g = nodes.g;
        let only = |name: &str, op: &str, inputs: usize| nodes.only(name, op, inputs).map(|(k, _)| k);
        // The fused step scales in f32: only an f32 constant.
        let scalar = |name: &str| self.one_value(scope, name).filter(|&(_, t)| t == DType::F32).map(|(v, _)| v);
        // `MatMul(Q, Kᵀ)`, scaled or not, as the value `name`: its nodes, Q, Kᵀ and the scale.
        type Scores = (Vec<usize>, [String; 2], Option<(f32, bool)>);
        let scores = |name: &str| -> Option<Scores> {
            let (k, scale, inner) = if let Some(k) = only(name, "Mul", 2) {
                let n = &g.node[k];
                let (x, c) = [(&n.input[0], &n.input[1]), (&n.input[1], &n.input[0])]
                    .into_iter()
                    .find(|(x, c)| scalar(x).is_none() && scalar(c).is_some())?;
                (Some(k), Some((scalar(c)?, false)), x.clone())
            } else if let Some(k) = only(name, "Div", 2) {
                let n = &g.node[k];
                (Some(k), Some((scalar(&n.input[1])?, true)), n.input[0].clone())
            } else {
                (None, None, name.to_string())
            };
            let mm = only(&inner, "MatMul", 2)?;
            let n = &g.node[mm];
            Some((k.into_iter().chain([mm]).collect(), [n.input[0].clone(), n.input[1].clone()], scale))
        };
        let mut folds = HashMap::new();
        for (k, last) in g.node.iter().enumerate() {
            if !Nodes::is(last, "MatMul", 2) {
                continue;
            }
            let Some(sm) = only(&last.input[0], "Softmax", 1) else { continue };
            let axis = g.node[sm].attribute.iter().find(|a| a.name == "axis").map(|a| a.i);
            if !(axis == Some(-1) || (axis.is_none() && self.opset >= 13)) {
                continue;
            }
            let x = g.node[sm].input[0].as_str();
            // Masked: an Add of the scores and the mask, in either order.
            let found = match only(x, "Add", 2) {
                Some(add) => {
                    let n = &g.node[add];
                    [(&n.input[0], &n.input[1]), (&n.input[1], &n.input[0])].into_iter().find_map(|(s, m)| {
                        let (mut nodes, [q, kt], scale) = scores(s)?;
                        nodes.push(add);
                        Some((nodes, vec![q, kt, last.input[1].clone(), m.clone()], scale))
                    })
                }
                None => scores(x).map(|(nodes, [q, kt], scale)| (nodes, vec![q, kt, last.input[1].clone()], scale)),
            };
            let Some((mut nodes, inputs, scale)) = found else { continue };
            // Left as they are: a zero scale (the graph's own Div divides by it); a `Kᵀ` that is
            // a constant (a product by weights, which MatMul packs, not attention); a product
            // that is the last step of an attention already folded (a chain of two).
            if scale.is_some_and(|(c, divide)| divide && c == 0.0)
                || inputs.iter().any(String::is_empty)
                || self.const_value(scope.get(&inputs[1])).is_some()
                || nodes.iter().any(|n| folds.contains_key(n))
            {
                continue;
            }
            nodes.push(sm);
            let name = format!("{}(Attention)", if last.name.is_empty() { &last.output[0] } else { &last.name });
            folds.insert(k, AttentionFold { nodes, inputs, scale, name });
        }
        folds
    }
}

/// An exact GELU written out as exporters decompose it, `y·½·(1 + erf(y/√2))`: the nodes it
/// replaces (all but the last, which becomes a `Gelu` of `input`).
struct GeluFold {
    nodes: [usize; 4],
    input: String,
}

impl Compiler<'_> {
    /// The exact GELUs among `g`'s nodes, keyed by their last node: `Mul(Mul(y, ½), Add(Erf(y
    /// / √2), 1))` (Hugging Face's exports) or `Mul(Mul(y, Add(Erf(y / √2), 1)), ½)` (PyTorch's
    /// `nn.GELU`), in either operand order, `y / √2` also as `y · (1/√2)`. Every value inside
    /// must have no other reader, and `y` only these two.
    fn gelu_folds(&self, nodes: &Nodes<'_, '_>, scope: &Scope<'_>) -> HashMap<usize, GeluFold> {
        let scalar = |name: &str| self.one_value(scope, name).map(|(v, _)| v);
        let only = |name: &str, op: &str| nodes.only(name, op, 2);
        // Of a binary node, the operand whose other operand is the constant `want`.
        let times = |n: &NodeProto, want: f32| -> Option<String> {
            let (a, b) = (&n.input[0], &n.input[1]);
            [(a, b), (b, a)]
                .into_iter()
                .find(|(x, c)| scalar(x).is_none() && scalar(c).is_some_and(|v| (v - want).abs() <= 1e-6 * want.abs()))
                .map(|(x, _)| x.clone())
        };
        // `1 + erf(y/√2)` as the value `name`: y and the three nodes.
        let plus_erf = |name: &str| -> Option<(String, [usize; 3])> {
            let (add_k, add) = only(name, "Add")?;
            let e = times(add, 1.0)?;
            let (erf_k, erf) = nodes.only(&e, "Erf", 1)?;
            let d = erf.input[0].as_str();
            let (y, scale_k) = if let Some((div_k, div)) = only(d, "Div") {
                // y / √2: the divisor must be the constant (a Div does not commute).
                let sqrt2 = scalar(&div.input[1]).is_some_and(|v| (v - std::f32::consts::SQRT_2).abs() <= 1e-6);
                if !sqrt2 || scalar(&div.input[0]).is_some() {
                    return None;
                }
                (div.input[0].clone(), div_k)
            } else {
                let (mul_k, mul) = only(d, "Mul")?;
                (times(mul, std::f32::consts::FRAC_1_SQRT_2)?, mul_k)
            };
            Some((y, [add_k, erf_k, scale_k]))
        };
        let mut folds = HashMap::new();
        for (k, last) in nodes.g.node.iter().enumerate() {
            if !Nodes::is(last, "Mul", 2) {
                continue;
            }
            let (a, b) = (last.input[0].as_str(), last.input[1].as_str());
            let found = [(a, b), (b, a)].into_iter().find_map(|(p, q)| {
                // Hugging Face: Mul(Mul(y, ½), 1 + erf).
                if let (Some((y, three)), Some((half_k, half))) = (plus_erf(q), only(p, "Mul"))
                    && times(half, 0.5).as_deref() == Some(y.as_str())
                {
                    return Some((y, [three[0], three[1], three[2], half_k]));
                }
                // PyTorch: Mul(Mul(y, 1 + erf), ½).
                let (inner_k, inner) = only(p, "Mul").filter(|_| scalar(q).is_some_and(|v| v == 0.5))?;
                let (x0, x1) = (inner.input[0].as_str(), inner.input[1].as_str());
                [(x0, x1), (x1, x0)].into_iter().find_map(|(y, e)| {
                    let (y2, three) = plus_erf(e)?;
                    (y2 == y).then_some((y2, [three[0], three[1], three[2], inner_k]))
                })
            });
            if let Some((input, folded)) = found
                && nodes.consumers.get(input.as_str()) == Some(&2)
            {
                folds.insert(k, GeluFold { nodes: folded, input });
            }
        }
        folds
    }
}

/// A zero Pad merged into the Conv after it.
struct PadFold {
    pad_node: usize,
    input: String,
    begin: Vec<i64>,
    end: Vec<i64>,
}

impl PadFold {
    fn apply(&self, conv: &mut NodeProto) {
        conv.input[0] = self.input.clone();
        let spatial = self.begin.len();
        let existing = conv
            .attribute
            .iter()
            .find(|a| a.name == "pads")
            .map(|a| a.ints.clone())
            .unwrap_or_else(|| vec![0; 2 * spatial]);
        let mut pads = existing;
        pads.resize(2 * spatial, 0);
        for d in 0..spatial {
            pads[d] += self.begin[d];
            pads[d + spatial] += self.end[d];
        }
        conv.attribute.retain(|a| a.name != "pads");
        conv.attribute.push(super::proto::AttributeProto {
            name: "pads".into(),
            r#type: super::proto::attribute_proto::AttributeType::Ints as i32,
            ints: pads,
            ..Default::default()
        });
    }
}

impl Step {
    fn name_op(&self) -> &str {
        self.name.rsplit('(').next().map(|s| s.trim_end_matches(')')).unwrap_or("")
    }
}

fn step_name(node: &NodeProto) -> String {
    format!(
        "{}({})",
        if node.name.is_empty() { node.output.first().map(String::as_str).unwrap_or("?") } else { &node.name },
        node.op_type
    )
}

/// Names a node reads, its subgraphs' outer references included.
fn reads(node: &NodeProto) -> Vec<&str> {
    fn sub<'a>(g: &'a GraphProto, out: &mut Vec<&'a str>) {
        for n in &g.node {
            out.extend(n.input.iter().filter(|i| !i.is_empty()).map(String::as_str));
            for a in &n.attribute {
                if let Some(s) = &a.g {
                    sub(s, out);
                }
            }
        }
    }
    let mut out: Vec<&str> = node.input.iter().filter(|i| !i.is_empty()).map(String::as_str).collect();
    for a in &node.attribute {
        if let Some(g) = &a.g {
            sub(g, &mut out);
        }
    }
    out
}

/// Whether every node's direct inputs are defined before it (the ONNX rule, usually kept).
fn is_topological(g: &GraphProto, scope: &Scope<'_>) -> bool {
    let mut defined: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    for n in &g.node {
        if n.input.iter().any(|i| !i.is_empty() && !defined.contains(i.as_str()) && scope.get(i).is_none()) {
            return false;
        }
        defined.extend(n.output.iter().map(String::as_str));
    }
    true
}

/// The graph with its nodes in a topological order (stable: a ready node keeps its place), or
/// an error naming a value nothing produces (or a cycle).
fn topological(g: &GraphProto, scope: &Scope<'_>) -> Result<GraphProto, NnError> {
    let produced: HashMap<&str, usize> =
        g.node.iter().enumerate().flat_map(|(k, n)| n.output.iter().map(move |o| (o.as_str(), k))).collect();
    let initial: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut deps: Vec<HashSet<usize>> = Vec::with_capacity(g.node.len());
    for n in &g.node {
        let mut d = HashSet::new();
        for name in reads(n) {
            match produced.get(name) {
                Some(&k) => {
                    d.insert(k);
                }
                None if initial.contains(name) || scope.get(name).is_some() => {}
                None => {
                    return Err(NnError::invalid_encoding(format!(
                        "node `{}` ({}) reads `{name}`, which nothing produces",
                        n.name, n.op_type
                    )));
                }
            }
        }
        deps.push(d);
    }
    // Kahn's algorithm, O(nodes + edges), taking ready nodes in their file order.
    let mut waiting: Vec<usize> = deps.iter().map(HashSet::len).collect();
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); g.node.len()];
    for (k, d) in deps.iter().enumerate() {
        for &p in d {
            readers[p].push(k);
        }
    }
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> =
        (0..g.node.len()).filter(|&k| waiting[k] == 0).map(std::cmp::Reverse).collect();
    let mut order = Vec::with_capacity(g.node.len());
    while let Some(std::cmp::Reverse(k)) = ready.pop() {
        order.push(k);
        for &r in &readers[k] {
            waiting[r] -= 1;
            if waiting[r] == 0 {
                ready.push(std::cmp::Reverse(r));
            }
        }
    }
    if order.len() < g.node.len() {
        return Err(NnError::invalid_encoding("the graph has a cycle"));
    }
    let mut sorted = g.clone();
    sorted.node = order.into_iter().map(|k| g.node[k].clone()).collect();
    Ok(sorted)
}

/// How many nodes (here or in nested branches) read each name.
fn consumer_counts(g: &GraphProto) -> HashMap<&str, usize> {
    fn walk<'a>(g: &'a GraphProto, counts: &mut HashMap<&'a str, usize>) {
        for n in &g.node {
            for i in &n.input {
                *counts.entry(i.as_str()).or_default() += 1;
            }
            for a in &n.attribute {
                if let Some(sub) = &a.g {
                    walk(sub, counts);
                }
            }
        }
        for o in &g.output {
            *counts.entry(o.name.as_str()).or_default() += 1;
        }
    }
    let mut counts = HashMap::new();
    walk(g, &mut counts);
    counts
}

/// Frees each slot defined in a block right after its last reader in that block.
/// Each step's constant inputs (`None` where an input is not a constant).
fn constant_inputs<'a>(step: &Step, consts: &'a [Tensor]) -> Vec<Option<&'a Tensor>> {
    step.inputs
        .iter()
        .map(|s| match s {
            Some(Src::Const(k)) => consts.get(*k),
            _ => None,
        })
        .collect()
}

/// Lets each operator derive what it keeps from its constant inputs (packed weights) now, at
/// load, rather than on the first request.
fn prepare(block: &Block, consts: &[Tensor]) {
    for step in &block.steps {
        match &step.kind {
            Kind::Op(op) => op.prepare(&constant_inputs(step, consts)),
            Kind::If { then_block, else_block } => {
                prepare(then_block, consts);
                prepare(else_block, consts);
            }
        }
    }
}

/// At most what [`prepare`] allocates, over the block and its branches (one operator after
/// another).
fn prepared_bytes(block: &Block, consts: &[Tensor]) -> ops::Prepared {
    block.steps.iter().fold(ops::Prepared::default(), |acc, step| {
        acc.then(match &step.kind {
            Kind::Op(op) => op.prepared_bytes(&constant_inputs(step, consts)),
            Kind::If { then_block, else_block } => {
                prepared_bytes(then_block, consts).then(prepared_bytes(else_block, consts))
            }
        })
    })
}

/// The slots `step` reads, its branches' included.
fn slots_read(step: &Step, out: &mut Vec<usize>) {
    out.extend(step.inputs.iter().flatten().filter_map(|s| match s {
        Src::Slot(x) => Some(*x),
        Src::Const(_) => None,
    }));
    if let Kind::If { then_block, else_block } = &step.kind {
        for b in [then_block, else_block] {
            for s in &b.steps {
                slots_read(s, out);
            }
            out.extend(b.outputs.iter().filter_map(|s| if let Src::Slot(x) = s { Some(*x) } else { None }));
        }
    }
}

/// Fuses each depthwise Conv whose output only a pointwise Conv reads, as its first input,
/// into one step in the pointwise one's place, and then each pointwise Conv whose output only
/// such a step reads into it ([`ops::chain`]: intermediate results then stay in cache).
fn fuse_conv_chains(block: &mut Block, consts: &[Tensor]) {
    for _ in 0..2 {
        fuse_conv_pairs(block, consts);
    }
}

/// One round of [`fuse_conv_chains`]: each step whose output only one later step reads, as
/// its first input, fused with it where [`ops::chain`] takes the pair.
fn fuse_conv_pairs(block: &mut Block, consts: &[Tensor]) {
    let kept: HashSet<usize> =
        block.outputs.iter().filter_map(|s| if let Src::Slot(x) = s { Some(*x) } else { None }).collect();
    let weight = |s: &Step| match s.inputs.get(1).copied().flatten() {
        Some(Src::Const(i)) => consts.get(i).map(|t| t.dims().to_vec()),
        _ => None,
    };
    // The steps reading each slot, found once (a scan per candidate made loading quadratic in
    // the graph's size). A fusion below keeps it right for every later candidate: the fused
    // step reads the first's inputs, which later candidates do not produce.
    let readers = readers(block);
    let mut steps: Vec<Option<Step>> = std::mem::take(&mut block.steps).into_iter().map(Some).collect();
    for k in 0..steps.len() {
        let Some(first) = &steps[k] else { continue };
        let (&[out], Kind::Op(_), Some(w1)) = (first.outputs.as_slice(), &first.kind, weight(first)) else { continue };
        if kept.contains(&out) {
            continue;
        }
        let Some(&[j]) = readers.get(&out).map(Vec::as_slice) else { continue };
        let Some(second) = &steps[j] else { continue };
        let sole_first_input = second.inputs.first() == Some(&Some(Src::Slot(out)))
            && !second.inputs[1..].contains(&Some(Src::Slot(out)))
            && matches!(second.kind, Kind::Op(_));
        let Some(w2) = weight(second).filter(|_| sole_first_input) else { continue };
        let (Some(first), Some(second)) = (steps[k].take(), steps[j].take()) else { continue };
        let (Kind::Op(a), Kind::Op(b)) = (first.kind, second.kind) else {
            unreachable!("both checked to be operators")
        };
        let at = |s: &[Option<Src>], i: usize| s.get(i).copied().flatten();
        match ops::chain(a, &w1, b, &w2) {
            Ok(op) => {
                // The first's input, weight and bias, then the second's operands after its
                // first input (a Conv's weight and bias, or a chain's four).
                let mut inputs: Vec<Option<Src>> = (0..3).map(|i| at(&first.inputs, i)).collect();
                let tail = if second.inputs.len() > 3 { 4 } else { 2 };
                inputs.extend((1..=tail).map(|i| at(&second.inputs, i)));
                steps[j] = Some(Step {
                    kind: Kind::Op(op),
                    op: first.op,
                    name: format!("{}+{}", first.name, second.name),
                    inputs,
                    outputs: second.outputs,
                    free: Vec::new(),
                });
            }
            Err((a, b)) => {
                steps[k] = Some(Step { kind: Kind::Op(a), ..first });
                steps[j] = Some(Step { kind: Kind::Op(b), ..second });
            }
        }
    }
    block.steps = steps.into_iter().flatten().collect();
}

/// The steps reading each slot, in order.
fn readers(block: &Block) -> HashMap<usize, Vec<usize>> {
    let mut readers: HashMap<usize, Vec<usize>> = HashMap::new();
    for (j, step) in block.steps.iter().enumerate() {
        let mut r = Vec::new();
        slots_read(step, &mut r);
        r.sort_unstable();
        r.dedup();
        for slot in r {
            readers.entry(slot).or_default().push(j);
        }
    }
    readers
}

/// Fuses each `Add` that alone reads a step's only output into that step where the step
/// takes it ([`ops::Op::fuse_residual`]: a fused convolution block), the Add's other operand
/// appended to its inputs: the block adds its residual while the output is still in cache.
/// Only where that operand exists before the step runs (a graph input or an earlier step's
/// output), since the fused step keeps the block's place.
fn fuse_residual_adds(block: &mut Block) {
    let kept: HashSet<usize> =
        block.outputs.iter().filter_map(|s| if let Src::Slot(x) = s { Some(*x) } else { None }).collect();
    let readers = readers(block);
    let made_at: HashMap<usize, usize> =
        block.steps.iter().enumerate().flat_map(|(k, s)| s.outputs.iter().map(move |&o| (o, k))).collect();
    let mut steps: Vec<Option<Step>> = std::mem::take(&mut block.steps).into_iter().map(Some).collect();
    for j in 0..steps.len() {
        let Some(add) = &steps[j] else { continue };
        // An Add node's own step: a step that has taken an Add over (a dense layer's bias)
        // is named after it but is not one.
        let (Kind::Op(_), "Add", &[Some(Src::Slot(a)), Some(Src::Slot(b))]) =
            (&add.kind, add.op.as_str(), add.inputs.as_slice())
        else {
            continue;
        };
        for (out, other) in [(a, b), (b, a)] {
            let Some(&k) = made_at.get(&out) else { continue };
            let sole = readers.get(&out).map(Vec::as_slice) == Some(&[j][..]);
            let ready = made_at.get(&other).is_none_or(|&p| p < k);
            if out == other || kept.contains(&out) || !sole || !ready {
                continue;
            }
            let Some(Step { kind: Kind::Op(op), outputs, .. }) = steps[k].as_mut() else { continue };
            if outputs.as_slice() != [out] || !op.fuse_residual() {
                continue;
            }
            let Some(add) = steps[j].take() else { break };
            if let Some(step) = steps[k].as_mut() {
                step.inputs.push(Some(Src::Slot(other)));
                step.name = format!("{}+{}", step.name, add.name);
                step.outputs = add.outputs;
            }
            break;
        }
    }
    block.steps = steps.into_iter().flatten().collect();
}

fn plan_frees(block: &mut Block, defined_outside: &HashSet<usize>) {
    let kept: HashSet<usize> =
        block.outputs.iter().filter_map(|s| if let Src::Slot(x) = s { Some(*x) } else { None }).collect();
    let mut defined: HashSet<usize> = defined_outside.clone();
    for s in &block.steps {
        defined.extend(s.outputs.iter().copied());
    }
    let mut last: HashMap<usize, usize> = HashMap::new();
    for (k, s) in block.steps.iter().enumerate() {
        let mut r = Vec::new();
        slots_read(s, &mut r);
        for x in r {
            last.insert(x, k);
        }
        // An output nobody reads is dropped at once.
        for &o in &s.outputs {
            last.entry(o).or_insert(k);
        }
    }
    for (slot, k) in last {
        if defined.contains(&slot) && !kept.contains(&slot) {
            block.steps[k].free.push(slot);
        }
    }
    for s in &mut block.steps {
        if let Kind::If { then_block, else_block } = &mut s.kind {
            plan_frees(then_block, &HashSet::new());
            plan_frees(else_block, &HashSet::new());
        }
    }
}
