//! Runs an ONNX model on a synthetic input and logs where the time goes, per operator.
//! Usage: `EIR_ONNX_PROFILE=1 cargo run -p eir --example onnx_profile -- MODEL DIMS...`
//! (e.g. `models/efficientnet-lite0 1 3 224 224`). `EIR_PROFILE_RUNS=N` runs it N times (3).

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() > 2, "usage: onnx_profile MODEL DIMS...");
    let dims: Vec<u32> = args[2..].iter().map(|d| d.parse()).collect::<Result<_, _>>()?;
    let n: usize = dims.iter().map(|&d| d as usize).product();
    let path = std::path::Path::new(&args[1]);
    let model = eir::nn::backend::load(eir::nn::backend::Source::Path(path), eir::nn::Target::Cpu)?;
    let name = model.input_names()[0].clone();
    let data: Vec<u8> = (0..n).flat_map(|i| ((2.0 * (0.001 * i as f64).sin()) as f32).to_le_bytes()).collect();
    let x = eir::nn::tensor::HostTensor::new(dims, eir::nn::bindings::tensor::TensorType::Fp32, data)?;
    let mut inputs = vec![(name, x)];
    // Silero VAD also takes its recurrent state and the sample rate.
    if model.input_names().iter().any(|n| n == "state") {
        let zeros = vec![0u8; 2 * 128 * 4];
        let f32t = eir::nn::bindings::tensor::TensorType::Fp32;
        inputs.push(("state".into(), eir::nn::tensor::HostTensor::new(vec![2, 1, 128], f32t, zeros)?));
        let i64t = eir::nn::bindings::tensor::TensorType::I64;
        inputs.push(("sr".into(), eir::nn::tensor::HostTensor::new(vec![], i64t, 16000i64.to_le_bytes().to_vec())?));
    }
    let runs = std::env::var("EIR_PROFILE_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    for _ in 0..runs {
        let t = std::time::Instant::now();
        model.compute(inputs.clone())?;
        eprintln!("compute: {:?}", t.elapsed());
    }
    Ok(())
}
