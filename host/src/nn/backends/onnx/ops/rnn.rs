//! `LSTM` (forward, reverse, bidirectional; default activations; ONNX gate order i, o, f, c).

use candle_core::{DType, Tensor, TensorId};

use super::{Built, Clamp, Derived, Node, count, input, wide, with_f32};
use crate::nn::error::NnError;
use crate::nn::kernels::act::lstm_cells;
use crate::nn::kernels::sgemm::{Packed, gemm};

pub(super) fn build(name: &str, node: &Node<'_>) -> Option<Built> {
    if name != "LSTM" {
        return None;
    }
    Some(Lstm::build(node))
}

struct Lstm {
    hidden: usize,
    directions: Vec<bool>,
    batch_first: bool,
    clip: Option<f64>,
    /// Per direction, the gate weights as one matrix, derived from `W` and `R`.
    gates: Derived<Vec<Gates>, (TensorId, TensorId)>,
}

/// One direction's gate weights, `W` and `R` side by side (`4h × (features + h)`), so that a
/// step's gates for the whole batch are one product with `[x_t; h_{t-1}]`, packed for the GEMM
/// kernel where it runs.
struct Gates {
    wr: Vec<f32>,
    packed: Option<Packed>,
}

impl Gates {
    /// Every direction's gates from `w` (`[dirs, 4h, features]`) and `r` (`[dirs, 4h, h]`).
    fn derive(w: &[f32], r: &[f32], dirs: usize, rows: usize, features: usize, h: usize) -> Vec<Gates> {
        let k = features + h;
        (0..dirs)
            .map(|d| {
                let mut wr = Vec::with_capacity(rows * k);
                for g in 0..rows {
                    let at = d * rows + g;
                    wr.extend_from_slice(&w[at * features..(at + 1) * features]);
                    wr.extend_from_slice(&r[at * h..(at + 1) * h]);
                }
                let packed = Packed::new(rows, k, &wr);
                Gates { wr, packed }
            })
            .collect()
    }
}

impl Lstm {
    fn build(node: &Node<'_>) -> Built {
        let hidden = match node.int("hidden_size") {
            Some(h) if (1..=1 << 20).contains(&h) => h as usize,
            Some(h) => return Err(node.bad(format!("attribute `hidden_size` holds {h}, outside 1..=1048576"))),
            None => return Err(node.bad("missing attribute `hidden_size`")),
        };
        let directions = match node.string("direction").as_deref().unwrap_or("forward") {
            "forward" => vec![false],
            "reverse" => vec![true],
            "bidirectional" => vec![false, true],
            other => return Err(node.bad(format!("unknown direction `{other}`"))),
        };
        if let Some(acts) = node.strings("activations") {
            let default = ["Sigmoid", "Tanh", "Tanh"];
            if acts.chunks(3).any(|c| c.iter().zip(default).any(|(a, d)| !a.eq_ignore_ascii_case(d))) {
                return Err(NnError::unsupported(format!("LSTM activations {acts:?} (only Sigmoid, Tanh, Tanh)")));
            }
        }
        if node.int_or("input_forget", 0) != 0 {
            return Err(NnError::unsupported("LSTM with input_forget"));
        }
        let clip = node.attr("clip").map(|a| f64::from(a.f));
        Ok(Box::new(Lstm {
            hidden,
            directions,
            batch_first: node.int_or("layout", 0) == 1,
            clip,
            gates: Derived::default(),
        }))
    }
}

impl super::Op for Lstm {
    fn bound(&self, i: &[Option<&Tensor>]) -> Result<u64, NnError> {
        let x = input(i, 0, "LSTM")?;
        let &[a, b, _] = x.dims() else {
            return Err(NnError::invalid_argument(format!("LSTM input {:?} is not 3-D", x.dims())));
        };
        let (seq, batch) = if self.batch_first { (b, a) } else { (a, b) };
        let dirs = self.directions.len();
        // Y and the final states, a step's `[x_t; h]` and gates, plus an f32 copy of every
        // input (two, counted by `wide`, of W and R where they are derived: joined and packed).
        let outputs = count(&[seq, dirs, batch, self.hidden])?.saturating_add(count(&[2, dirs, batch, self.hidden])?);
        let step = count(&[batch, x.dims()[2].saturating_add(5 * self.hidden)])?;
        let copies =
            i.iter().flatten().try_fold(0u64, |acc, t| Ok::<_, NnError>(acc.saturating_add(count(t.dims())?)))?;
        wide(outputs.saturating_add(step).saturating_add(copies), 2)
    }

    fn prepared_bytes(&self, constants: &[Option<&Tensor>]) -> super::Prepared {
        // W and R joined, then packed (whole panels, a panel's padding per direction), kept;
        // f32 copies of both while they are read.
        match (constants.get(1), constants.get(2)) {
            (Some(Some(w)), Some(Some(r))) => {
                let values = (w.elem_count() as u64).saturating_add(r.elem_count() as u64);
                let pad = (self.directions.len() as u64)
                    .saturating_mul(16)
                    .saturating_mul(w.dims().last().map_or(0, |&f| f as u64).saturating_add(self.hidden as u64));
                super::Prepared {
                    kept: super::f32_bytes(values.saturating_mul(2).saturating_add(pad)),
                    transient: super::f32_bytes(values),
                }
            }
            _ => Default::default(),
        }
    }

    fn prepare(&self, constants: &[Option<&Tensor>]) {
        // Constant weights are joined and packed at load, not on the first request.
        if let (Some(Some(w)), Some(Some(r))) = (constants.get(1), constants.get(2))
            && let [_, _, features] = *w.dims()
        {
            let _ = self.gates_of(w, r, features);
        }
    }

    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let x = input(i, 0, "LSTM")?;
        let (w, r) = (input(i, 1, "LSTM")?, input(i, 2, "LSTM")?);
        if i.get(7).copied().flatten().is_some() {
            return Err(NnError::unsupported("LSTM peephole weights"));
        }
        let x = if self.batch_first { x.transpose(0, 1)? } else { x.clone() };
        let (seq, batch, features) = x.dims3()?;
        let h = self.hidden;
        let dirs = self.directions.len();
        if w.dims() != [dirs, 4 * h, features] || r.dims() != [dirs, 4 * h, h] {
            return Err(NnError::invalid_argument(format!(
                "LSTM weights {:?}/{:?} do not fit input {:?} and hidden {h}",
                w.dims(),
                r.dims(),
                x.dims()
            )));
        }
        let dtype = x.dtype();
        let vec =
            |t: &Tensor| -> Result<Vec<f32>, NnError> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
        let xs = vec(&x)?;
        let gates = self.gates_of(w, r, features)?;
        let bs = i.get(3).copied().flatten().map(vec).transpose()?;
        if let Some(b) = &bs
            && b.len() != dirs * 8 * h
        {
            return Err(NnError::invalid_argument(format!(
                "LSTM bias of {} values; it must be [{dirs}, {}]",
                b.len(),
                8 * h
            )));
        }

        let state = |k: usize| -> Result<Vec<f32>, NnError> {
            match i.get(k).copied().flatten() {
                Some(t) if t.elem_count() == dirs * batch * h => vec(t),
                Some(t) => Err(NnError::invalid_argument(format!(
                    "LSTM initial state {:?} is not [{dirs}, {batch}, {h}]",
                    t.dims()
                ))),
                None => Ok(vec![0.0; dirs * batch * h]),
            }
        };
        let (h0, c0) = (state(5)?, state(6)?);

        // y: [seq, dirs, batch, h]; final h and c: [dirs, batch, h].
        let mut y = super::zeros_f32(seq * dirs * batch * h)?;
        let (mut hn, mut cn) = (h0, c0);
        let k = features + h;
        // Per step: `[x_t; h]` as k rows of `batch` columns in, the gates (4h rows) out.
        let (mut xh, mut z) = (vec![0f32; k * batch], vec![0f32; 4 * h * batch]);
        let mut zb = vec![0f32; if batch == 1 { 0 } else { 4 * h }];
        let clip = self.clip.map(|c| Clamp { lo: -(c as f32), hi: c as f32 });
        for (d, &reverse) in self.directions.iter().enumerate() {
            let g = gates.get(d).ok_or_else(|| NnError::runtime("LSTM: gate weights missing a direction"))?;
            let bias: Vec<f32> = match &bs {
                Some(b) => (0..4 * h).map(|g| b[d * 8 * h + g] + b[d * 8 * h + 4 * h + g]).collect(),
                None => vec![0.0; 4 * h],
            };
            let hs = &mut hn[d * batch * h..(d + 1) * batch * h];
            let cs = &mut cn[d * batch * h..(d + 1) * batch * h];
            for step in 0..seq {
                let t = if reverse { seq - 1 - step } else { step };
                for b in 0..batch {
                    let xt = &xs[(t * batch + b) * features..(t * batch + b + 1) * features];
                    for (f, &v) in xt.iter().enumerate() {
                        xh[f * batch + b] = v;
                    }
                    for (j, &v) in hs[b * h..(b + 1) * h].iter().enumerate() {
                        xh[(features + j) * batch + b] = v;
                    }
                }
                gemm([4 * h, batch, k], &g.wr, g.packed.as_ref(), &xh, &mut z, Some(&bias), clip)?;
                for b in 0..batch {
                    let (hb, cb) = (&mut hs[b * h..(b + 1) * h], &mut cs[b * h..(b + 1) * h]);
                    // Row b's gates, gate by gate (as they are already when the batch is 1).
                    let zb = if batch == 1 {
                        &z[..]
                    } else {
                        for (g, v) in zb.iter_mut().enumerate() {
                            *v = z[g * batch + b];
                        }
                        &zb[..]
                    };
                    lstm_cells(zb, cb, hb);
                    let at = ((t * dirs + d) * batch + b) * h;
                    y[at..at + h].copy_from_slice(hb);
                }
            }
        }
        let dev = x.device();
        let y = Tensor::from_vec(y, (seq, dirs, batch, h), dev)?.to_dtype(dtype)?;
        let yh = Tensor::from_vec(hn, (dirs, batch, h), dev)?.to_dtype(dtype)?;
        let yc = Tensor::from_vec(cn, (dirs, batch, h), dev)?.to_dtype(dtype)?;
        let y = if self.batch_first { y.permute((2, 0, 1, 3))? } else { y };
        let (yh, yc) = if self.batch_first { (yh.transpose(0, 1)?, yc.transpose(0, 1)?) } else { (yh, yc) };
        Ok(vec![y, yh, yc])
    }
}

impl Lstm {
    /// The gate weights for `w` and `r`, derived once per pair of tensors (initializers: once
    /// per model), after their shapes are checked against the attributes and `features`.
    fn gates_of(&self, w: &Tensor, r: &Tensor, features: usize) -> Result<std::sync::Arc<Vec<Gates>>, NnError> {
        let (dirs, h) = (self.directions.len(), self.hidden);
        if w.dims() != [dirs, 4 * h, features] || r.dims() != [dirs, 4 * h, h] {
            return Err(NnError::invalid_argument(format!(
                "LSTM weights {:?}/{:?} do not fit {features} features and hidden {h}",
                w.dims(),
                r.dims()
            )));
        }
        with_f32(w, |ws| {
            with_f32(r, |rs| self.gates.get((w.id(), r.id()), || Gates::derive(ws, rs, dirs, 4 * h, features, h)))
        })?
    }
}
