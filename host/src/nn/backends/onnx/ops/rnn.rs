//! `LSTM` (forward, reverse, bidirectional; default activations; ONNX gate order i, o, f, c).

use candle_core::{DType, Tensor};

use super::{Built, Node, count, input, wide};
use crate::nn::error::NnError;
use crate::nn::kernels::sgemm::dot;

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
        Ok(Box::new(Lstm { hidden, directions, batch_first: node.int_or("layout", 0) == 1, clip }))
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
        // Y and the final states, plus an f32 copy of every input.
        let outputs = count(&[seq, dirs, batch, self.hidden])?.saturating_add(count(&[2, dirs, batch, self.hidden])?);
        let copies =
            i.iter().flatten().try_fold(0u64, |acc, t| Ok::<_, NnError>(acc.saturating_add(count(t.dims())?)))?;
        wide(outputs.saturating_add(copies), 2)
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
        let (ws, rs) = (vec(w)?, vec(r)?);
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
        let (mut hn, mut cn) = (h0.clone(), c0.clone());
        let mut gates = vec![0f32; 4 * h];
        for (d, &reverse) in self.directions.iter().enumerate() {
            let wd = &ws[d * 4 * h * features..(d + 1) * 4 * h * features];
            let rd = &rs[d * 4 * h * h..(d + 1) * 4 * h * h];
            let bias: Vec<f32> = match &bs {
                Some(b) => (0..4 * h).map(|g| b[d * 8 * h + g] + b[d * 8 * h + 4 * h + g]).collect(),
                None => vec![0.0; 4 * h],
            };
            for b in 0..batch {
                let hs = &mut hn[(d * batch + b) * h..(d * batch + b + 1) * h];
                let cs = &mut cn[(d * batch + b) * h..(d * batch + b + 1) * h];
                for step in 0..seq {
                    let t = if reverse { seq - 1 - step } else { step };
                    let xt = &xs[(t * batch + b) * features..(t * batch + b + 1) * features];
                    for (g, out) in gates.iter_mut().enumerate() {
                        let wrow = &wd[g * features..(g + 1) * features];
                        let rrow = &rd[g * h..(g + 1) * h];
                        let mut acc = bias[g] + dot(wrow, xt) + dot(rrow, hs);
                        if let Some(c) = self.clip {
                            acc = acc.clamp(-(c as f32), c as f32);
                        }
                        *out = acc;
                    }
                    // ONNX gate order: input, output, forget, cell.
                    for k in 0..h {
                        let ig = sigmoid(gates[k]);
                        let og = sigmoid(gates[h + k]);
                        let fg = sigmoid(gates[2 * h + k]);
                        let cg = gates[3 * h + k].tanh();
                        cs[k] = fg * cs[k] + ig * cg;
                        hs[k] = og * cs[k].tanh();
                    }
                    let at = ((t * dirs + d) * batch + b) * h;
                    y[at..at + h].copy_from_slice(hs);
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

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
