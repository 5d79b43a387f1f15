//! `eir run`: one call of a pipeline plugin, or one run of a WASI command.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytesize::ByteSize;
use clap::Args;

use super::GlobalOptions;
use super::inputs::{parse_env, parse_inputs, parse_param};
use crate::Runtime;
use crate::engine::Artifact;
use crate::grants::{DirGrant, Stdio};
use crate::limits::Limits;
use crate::plugin::{CallError, Interface, PluginConfig, PluginKind};
use crate::registry::{NamedModel, Registry};
use crate::scheduler::Scheduler;
use crate::tensor::{self, Request};

/// Arguments of `eir run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The plugin: a component (.wasm), a core wasip1 module, WAT text, or with
    /// --allow-precompiled an `eir compile` artifact; or, with --config, a plugin's name there.
    #[arg(value_name = "PLUGIN")]
    plugin: PathBuf,
    /// A configuration file: its models are registered, and PLUGIN may name one of its plugins
    /// (whose limits and grants apply; flags given here add to or override them).
    #[arg(short, long, value_name = "FILE", env = "EIR_CONFIG")]
    config: Option<PathBuf>,
    /// Arguments passed to a command component (its argv after the program name).
    #[arg(value_name = "ARGS", trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,

    /// An input tensor: NAME=TEXT, NAME=@FILE (bytes; @- for stdin), or NAME:DTYPE[SHAPE]=V,V,...
    /// Repeating a text/file input appends elements to it.
    #[arg(short, long = "input", value_name = "SPEC")]
    inputs: Vec<String>,
    /// A whole KServe v2 JSON inference request ("-" for stdin); --input adds to its inputs.
    #[arg(long, value_name = "FILE")]
    request: Option<PathBuf>,
    /// A request parameter.
    #[arg(short, long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// Ask only for this output (repeatable).
    #[arg(long = "output", value_name = "NAME")]
    outputs: Vec<String>,
    /// Print the plugin's metadata (inputs and outputs) instead of calling it.
    #[arg(long)]
    metadata: bool,
    /// Pretty-print the JSON response.
    #[arg(long)]
    pretty: bool,

    /// Grant a host directory: HOST::GUEST, read-only unless suffixed :rw (":ro" is accepted too).
    #[arg(long = "dir", value_name = "HOST::GUEST[:ro|:rw]")]
    dirs: Vec<DirGrant>,
    /// Grant an environment variable: NAME=VALUE, or NAME to pass the host's value.
    #[arg(long = "env", value_name = "NAME[=VALUE]", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Register a model and grant it to the plugin: NAME=PATH, where PATH is a model directory
    /// (config.json + model.safetensors) or a model file; append @gpu to run it on the GPU.
    #[arg(long = "model", value_name = "NAME=PATH")]
    models: Vec<NamedModel>,
    /// Let the plugin load models from bytes (wasi-nn `load`), up to this total size.
    #[arg(long, value_name = "SIZE")]
    allow_load_bytes: Option<ByteSize>,
    /// Allow TCP/UDP sockets and name lookups (denied by default).
    #[arg(long)]
    allow_network: bool,
    /// Load a precompiled artifact (runs its machine code unchecked: only your own files).
    #[arg(long)]
    allow_precompiled: bool,

    /// Fuel per call (about one unit per wasm instruction).
    #[arg(long, value_name = "N")]
    fuel: Option<u64>,
    /// Wall-clock limit, e.g. 500ms, 2s, 1m.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Linear-memory cap, e.g. 64MiB.
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<ByteSize>,
    /// Largest request handed to the plugin, e.g. 16MiB.
    #[arg(long, value_name = "SIZE")]
    max_request: Option<ByteSize>,
    /// Largest response accepted from the plugin.
    #[arg(long, value_name = "SIZE")]
    max_response: Option<ByteSize>,
    /// Most memory one model computation may hold in intermediate values, e.g. 2GiB.
    #[arg(long, value_name = "SIZE")]
    max_compute_memory: Option<ByteSize>,
}

impl RunArgs {
    fn limits(&self, base: Limits) -> Limits {
        let mut limits = base;
        if let Some(fuel) = self.fuel {
            limits.fuel = fuel;
        }
        if let Some(timeout) = self.timeout {
            limits.timeout = timeout;
        }
        if let Some(max) = self.max_memory {
            limits.max_memory = max;
        }
        if let Some(max) = self.max_request {
            limits.max_request = max;
        }
        if let Some(max) = self.max_response {
            limits.max_response = max;
        }
        if let Some(max) = self.max_compute_memory {
            limits.max_compute_memory = max;
        }
        limits
    }

    fn plugin_name(&self) -> String {
        self.plugin.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin".into())
    }

    fn request(&self) -> anyhow::Result<Request> {
        let mut request = match &self.request {
            Some(path) => {
                let text = if path.as_os_str() == "-" {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf).context("reading the request from stdin")?;
                    buf
                } else {
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
                };
                tensor::json::decode_request(&text)
                    .and_then(tensor::json::WireRequest::into_request)
                    .map_err(anyhow::Error::msg)
                    .context("invalid request")?
            }
            None => Request { id: String::new(), inputs: vec![], outputs: vec![], parameters: vec![] },
        };
        request.inputs.extend(parse_inputs(&self.inputs)?);
        request.parameters.extend(self.params.iter().cloned());
        request.outputs.extend(self.outputs.iter().cloned());
        Ok(request)
    }
}

/// Runs `eir run`.
pub async fn run(args: RunArgs, global: &GlobalOptions) -> anyhow::Result<ExitCode> {
    // The configuration with its bundles merged in, as `eir serve` reads it.
    let file = match args.config.as_deref() {
        Some(path) => Some(crate::bundle::serve::load_config(path).await?),
        None => None,
    };
    let mut models = file.as_ref().map(|c| c.models.clone()).unwrap_or_default();
    models.extend(args.models.iter().map(|m| (m.name.clone(), m.decl.clone())));
    let registry = Registry::new(models, Scheduler::for_this_machine());
    let runtime = Runtime::with_registry(global.engine_config(), Arc::new(registry))?;

    // PLUGIN names a configured plugin, or is a path.
    let key = args.plugin.to_string_lossy();
    if let Some(path) = file.as_ref().and_then(|c| c.absent.get(&*key)) {
        anyhow::bail!(
            "plugin `{key}` is not built yet: {} does not exist (scripts/build.sh builds it)",
            path.display()
        );
    }
    let declared = file.as_ref().and_then(|c| c.plugins.get(&*key));
    let (name, path, base) = match declared {
        Some(decl) => (args.plugin.to_string_lossy().into_owned(), decl.path.clone(), decl.config.clone()),
        None => (args.plugin_name(), args.plugin.clone(), PluginConfig::default()),
    };
    let mut argv = vec![name.clone()];
    argv.extend(args.args.iter().cloned());
    let mut grants = base.grants;
    grants.dirs.extend(args.dirs.iter().cloned());
    grants.env.extend(args.env.iter().cloned());
    grants.args = argv;
    grants.network |= args.allow_network;
    grants.nn.models.extend(args.models.iter().map(|m| m.name.clone()));
    if args.allow_load_bytes.is_some() {
        grants.nn.load_from_bytes = args.allow_load_bytes;
    }
    let mut config = PluginConfig { reuse: 1, limits: args.limits(base.limits), grants, ..Default::default() };
    let artifact = runtime.engine().load_file(&path, args.allow_precompiled)?;
    // A command's stdio passes straight through; a pipeline plugin's goes to the log.
    let interface = match &artifact {
        Artifact::Component(component) => Interface::of(component, runtime.engine().wasmtime()),
        Artifact::Module(module) => Interface::of_module(module),
    };
    if interface.kind() == Some(PluginKind::Command) {
        config.grants.stdio = Stdio::Inherit;
        config.grants.stdin = true;
    }
    let plugin = runtime.plugin(&name, artifact, config)?;

    match plugin.kind() {
        PluginKind::Command => {
            if !args.inputs.is_empty() || args.request.is_some() || args.metadata {
                anyhow::bail!(
                    "{} is a command: it takes arguments, not --input/--request/--metadata",
                    args.plugin.display()
                );
            }
            let code = plugin.run_command().await.map_err(report)?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        PluginKind::Pipeline => {
            if !args.args.is_empty() {
                anyhow::bail!(
                    "{} is a pipeline plugin: give it --input values, not arguments ({:?})",
                    args.plugin.display(),
                    args.args
                );
            }
            let json = if args.metadata {
                let metadata = plugin.metadata().await.map_err(report)?;
                tensor::metadata_to_json(&name, &metadata)
            } else {
                let request = args.request()?;
                let response = plugin.handle(&request).await.map_err(report)?;
                let json = tensor::json::ResponseJson {
                    model: &name,
                    version: None,
                    id: &request.id,
                    response: &response,
                    binary_data_sizes: &[],
                };
                serde_json::to_value(&json)?
            };
            let text = if args.pretty { serde_json::to_string_pretty(&json) } else { serde_json::to_string(&json) }?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prefixes the error with its kind, so scripts can match on e.g. `[out_of_fuel]`.
fn report(err: CallError) -> anyhow::Error {
    anyhow::anyhow!("[{}] {err}", err.kind().as_str())
}
