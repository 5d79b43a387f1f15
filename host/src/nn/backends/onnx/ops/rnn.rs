//! `LSTM` (forward, reverse, bidirectional; default activations; ONNX gate order i, o, f, c).

use candle_core::{D, Tensor};

use super::{Built, Node, input};
use crate::nn::error::NnError;

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
        let hidden =
            node.int("hidden_size").filter(|&h| h > 0).ok_or_else(|| node.bad("missing hidden_size"))? as usize;
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
        let zeros = Tensor::zeros((dirs, batch, h), dtype, x.device())?;
        let h0 = i.get(5).copied().flatten().cloned().unwrap_or_else(|| zeros.clone());
        let c0 = i.get(6).copied().flatten().cloned().unwrap_or(zeros);

        let mut ys = Vec::with_capacity(dirs);
        let (mut hs, mut cs) = (Vec::with_capacity(dirs), Vec::with_capacity(dirs));
        for (d, &reverse) in self.directions.iter().enumerate() {
            let wd = w.get(d)?; // [4h, features]
            let rd = r.get(d)?.t()?.contiguous()?; // [h, 4h]
            // All input projections at once: [seq * batch, 4h].
            let mut xw = x.reshape((seq * batch, features))?.matmul(&wd.t()?)?;
            if let Some(b) = i.get(3).copied().flatten() {
                let b = b.get(d)?;
                xw = xw.broadcast_add(&(b.narrow(0, 0, 4 * h)? + b.narrow(0, 4 * h, 4 * h)?)?)?;
            }
            let xw = xw.reshape((seq, batch, 4 * h))?;
            let (mut ht, mut ct) = (h0.get(d)?, c0.get(d)?);
            let mut outs = vec![None; seq];
            let steps: Box<dyn Iterator<Item = usize>> =
                if reverse { Box::new((0..seq).rev()) } else { Box::new(0..seq) };
            for t in steps {
                let mut gates = (xw.get(t)? + ht.matmul(&rd)?)?;
                if let Some(c) = self.clip {
                    gates = gates.clamp(-c, c)?;
                }
                let gate = |k: usize| gates.narrow(D::Minus1, k * h, h);
                let (ig, og, fg, cg) = (
                    candle_nn::ops::sigmoid(&gate(0)?)?,
                    candle_nn::ops::sigmoid(&gate(1)?)?,
                    candle_nn::ops::sigmoid(&gate(2)?)?,
                    gate(3)?.tanh()?,
                );
                ct = ((fg * &ct)? + (ig * cg)?)?;
                ht = (og * ct.tanh()?)?;
                outs[t] = Some(ht.clone());
            }
            let outs: Vec<Tensor> = outs.into_iter().flatten().collect();
            ys.push(Tensor::stack(&outs, 0)?); // [seq, batch, h]
            hs.push(ht);
            cs.push(ct);
        }
        let y = Tensor::stack(&ys, 1)?; // [seq, dirs, batch, h]
        let y = if self.batch_first { y.permute((2, 0, 1, 3))? } else { y };
        let (yh, yc) = (Tensor::stack(&hs, 0)?, Tensor::stack(&cs, 0)?);
        let (yh, yc) = if self.batch_first { (yh.transpose(0, 1)?, yc.transpose(0, 1)?) } else { (yh, yc) };
        Ok(vec![y, yh, yc])
    }
}
