//! An unmodified-style wasi-nn program for `wasm32-wasip1` (the `wasi-nn` 0.6 crate, witx ABI).
//!
//! (The crate spells the autodetect encoding `Autodetec`.)
//!
//! `legacy-nn MODEL IDS` loads MODEL by name, runs it on one sentence of token ids
//! (comma-separated; attention mask all ones, type ids zero), mean-pools and L2-normalises
//! output 0, and prints the vector as comma-separated numbers. Errors go to stderr, exit 1.

use wasi_nn::{ExecutionTarget, GraphBuilder, GraphEncoding, TensorType};

fn run(model: &str, ids: &[i64]) -> Result<Vec<f32>, String> {
    let graph = GraphBuilder::new(GraphEncoding::Autodetec, ExecutionTarget::CPU)
        .build_from_cache(model)
        .map_err(|e| format!("load_by_name({model}): {e}"))?;
    let mut ctx = graph.init_execution_context().map_err(|e| format!("init_execution_context: {e}"))?;
    let dims = [1usize, ids.len()];
    let mask = vec![1i64; ids.len()];
    let types = vec![0i64; ids.len()];
    for (index, values) in [ids, &mask[..], &types[..]].into_iter().enumerate() {
        ctx.set_input(index, TensorType::I64, &dims, values).map_err(|e| format!("set_input({index}): {e}"))?;
    }
    ctx.compute().map_err(|e| format!("compute: {e}"))?;
    let mut hidden = vec![0f32; ids.len() * 384];
    let n = ctx.get_output(0, &mut hidden).map_err(|e| format!("get_output: {e}"))?;
    if n != hidden.len() * 4 {
        return Err(format!("get_output wrote {n} bytes, expected {}", hidden.len() * 4));
    }
    let mut pooled = vec![0f32; 384];
    for row in hidden.chunks(384) {
        pooled.iter_mut().zip(row).for_each(|(p, h)| *p += h / ids.len() as f32);
    }
    let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt();
    Ok(pooled.into_iter().map(|x| x / norm).collect())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(ids)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: legacy-nn MODEL ID,ID,...");
        std::process::exit(2);
    };
    let ids: Vec<i64> = ids.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    match run(model, &ids) {
        Ok(v) => println!("{}", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
