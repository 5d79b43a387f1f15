//! `eir compile`: ahead-of-time compilation into the cache, or into a file to ship.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;

use super::GlobalOptions;
use crate::engine::Engine;

/// Arguments of `eir compile`.
#[derive(Debug, Args)]
pub struct CompileArgs {
    /// Components or modules to compile.
    #[arg(value_name = "PLUGIN", required = true)]
    plugins: Vec<PathBuf>,
    /// Write the artifact here instead of the cache (one input only); load it later with
    /// `eir run --allow-precompiled`.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// Runs `eir compile`.
pub fn compile(args: CompileArgs, global: &GlobalOptions) -> anyhow::Result<ExitCode> {
    let engine = Engine::new(global.engine_config())?;
    if let Some(output) = &args.output {
        let [input] = args.plugins.as_slice() else {
            bail!("-o takes exactly one input");
        };
        let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
        let artifact = engine.precompile(&input.display().to_string(), &bytes)?;
        std::fs::write(output, &artifact).with_context(|| format!("writing {}", output.display()))?;
        println!("{} -> {} ({})", input.display(), output.display(), bytesize::ByteSize(artifact.len() as u64));
        return Ok(ExitCode::SUCCESS);
    }
    let Some(cache) = engine.cache() else {
        bail!("the compile cache is disabled (--no-cache); use -o FILE to write an artifact");
    };
    for input in &args.plugins {
        let started = Instant::now();
        engine.load_file(input, false)?;
        println!("{}: ready in {:.1?} (cache: {})", input.display(), started.elapsed(), cache.dir().display());
    }
    Ok(ExitCode::SUCCESS)
}
