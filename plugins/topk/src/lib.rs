//! Post-processing for classifiers: softmax (numerically stable) and the top `k` classes of
//! each row of a `logits` tensor (`[classes]` or `[batch, classes]`, FP32 or FP64).
//!
//! Parameters: `k` (default 5), `softmax` (default `true`; `false` ranks the raw scores), and
//! `labels_file`, a file of one label per line read from a directory granted to the plugin.
//! Outputs: `scores` (FP32 `[batch, k]`), `indices` (INT64 `[batch, k]`) and, with labels,
//! `labels` (BYTES `[batch, k]`).

use eir_guest::{Datatype, Error, Metadata, Plugin, Request, Response, Result, Tensor, TensorData, TensorSpec};

struct TopK;

/// Softmax of one row, shifted by its maximum so `exp` cannot overflow.
fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first.
fn top_k(row: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

fn read_labels(path: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::invalid_input(format!("cannot read labels_file `{path}`: {e} (is its directory granted?)"))
    })?;
    Ok(text.lines().map(|l| l.trim().to_string()).collect())
}

impl Plugin for TopK {
    fn metadata() -> Metadata {
        Metadata {
            description: "Softmax and top-k over logits".into(),
            inputs: vec![TensorSpec::new("logits", Datatype::Fp32, [-1, -1])],
            outputs: vec![
                TensorSpec::new("scores", Datatype::Fp32, [-1, -1]),
                TensorSpec::new("indices", Datatype::Int64, [-1, -1]),
                TensorSpec::new("labels", Datatype::Bytes, [-1, -1]),
            ],
        }
    }

    fn handle(request: Request) -> Result<Response> {
        let logits = request.input("logits")?;
        let values: Vec<f64> = match &logits.data {
            TensorData::Fp32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::Fp64(v) => v.clone(),
            other => {
                return Err(Error::invalid_input(format!("`logits` must be FP32 or FP64, not {:?}", other.datatype())));
            }
        };
        if values.iter().any(|x| x.is_nan()) {
            return Err(Error::invalid_input("`logits` contains NaN"));
        }
        let (batch, classes) = match logits.shape.as_slice() {
            [c] => (1, *c as usize),
            [b, c] => (*b as usize, *c as usize),
            other => {
                return Err(Error::invalid_input(format!(
                    "`logits` must be [classes] or [batch, classes], not {other:?}"
                )));
            }
        };
        if classes == 0 {
            return Err(Error::invalid_input("`logits` has no classes"));
        }
        let k: usize = request.param_or("k", 5)?;
        let k = k.clamp(1, classes);
        let apply_softmax: bool = request.param_or("softmax", true)?;
        let labels = request.param("labels_file").map(read_labels).transpose()?;
        if labels.is_none() && request.asks_for("labels") {
            return Err(Error::invalid_input(
                "output `labels` needs the `labels_file` parameter (a file of one label per line, in a directory \
                 granted to this plugin)",
            ));
        }
        if let Some(labels) = &labels
            && labels.len() < classes
        {
            return Err(Error::invalid_input(format!("labels_file has {} labels for {classes} classes", labels.len())));
        }

        let mut scores = Vec::with_capacity(batch * k);
        let mut indices = Vec::with_capacity(batch * k);
        let mut names = Vec::with_capacity(batch * k);
        for row in values.chunks(classes) {
            let row = if apply_softmax { softmax(row) } else { row.to_vec() };
            for i in top_k(&row, k) {
                scores.push(row[i] as f32);
                indices.push(i as i64);
                if let Some(labels) = &labels {
                    names.push(labels[i].clone().into_bytes());
                }
            }
        }
        let shape = vec![batch as u64, k as u64];
        let mut response = Response::new().with(Tensor::new("scores", shape.clone(), scores)?).with(Tensor::new(
            "indices",
            shape.clone(),
            indices,
        )?);
        if labels.is_some() {
            let mut t = Tensor::bytes("labels", names);
            t.shape = shape;
            response = response.with(t);
        }
        Ok(response)
    }
}

eir_guest::export_plugin!(TopK);
