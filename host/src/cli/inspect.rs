//! `eir inspect`: what a component imports and exports, and what kind of plugin it is.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::GlobalOptions;
use crate::Runtime;
use crate::engine::Artifact;
use crate::plugin::{Interface, PluginConfig, PluginKind};
use crate::tensor;

/// Arguments of `eir inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The component to inspect.
    #[arg(value_name = "PLUGIN")]
    plugin: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Accept a precompiled artifact (only your own files).
    #[arg(long)]
    allow_precompiled: bool,
}

/// Runs `eir inspect`.
pub async fn inspect(args: InspectArgs, global: &GlobalOptions) -> anyhow::Result<ExitCode> {
    let runtime = Runtime::new(global.engine_config())?;
    let size = std::fs::metadata(&args.plugin).map(|m| m.len()).unwrap_or(0);
    let artifact = runtime.engine().load_file(&args.plugin, args.allow_precompiled)?;
    let (kind, interface) = match &artifact {
        Artifact::Module(module) => {
            let interface = Interface::of_module(module);
            (
                if interface.kind().is_some() { "command (core module, WASI preview 1)" } else { "core module" },
                interface,
            )
        }
        Artifact::Component(component) => {
            let interface = Interface::of(component, runtime.engine().wasmtime());
            (interface.kind().map(PluginKind::as_str).unwrap_or("component (not a plugin)"), interface)
        }
    };
    // A pipeline plugin describes itself; ask it (no grants, default limits).
    let mut metadata = None;
    let mut problem = None;
    if interface.kind() == Some(PluginKind::Pipeline) {
        let name = args.plugin.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        match runtime.plugin(&name, artifact, PluginConfig::default()) {
            Ok(plugin) => match plugin.metadata().await {
                Ok(m) => metadata = Some(tensor::metadata_to_json(&name, &m)),
                Err(e) => problem = Some(e.to_string()),
            },
            Err(e) => problem = Some(e.to_string()),
        }
    }

    if args.json {
        let out = json!({
            "path": args.plugin,
            "size": size,
            "kind": kind,
            "imports": interface.imports,
            "exports": interface.exports,
            "metadata": metadata,
            "problem": problem,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: {kind}, {}", args.plugin.display(), bytesize::ByteSize(size));
    println!("imports:");
    for i in &interface.imports {
        println!("  {i}");
    }
    println!("exports:");
    for e in &interface.exports {
        println!("  {e}");
    }
    if let Some(m) = metadata {
        println!("metadata:\n{}", serde_json::to_string_pretty(&m)?);
    }
    if let Some(p) = problem {
        println!("cannot run here: {p}");
    }
    Ok(ExitCode::SUCCESS)
}
