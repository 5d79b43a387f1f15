//! `eir serve` and `eir key`: the gateway, and API keys for its configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::GlobalOptions;
use crate::Runtime;
use crate::gateway::{self, key_hash};

/// Arguments of `eir serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration (models, plugins, tenants, [server]).
    #[arg(short, long, value_name = "FILE", env = "EIR_CONFIG", default_value = "plugins/eir.toml")]
    config: PathBuf,
    /// Address to listen on (overrides server.listen), e.g. 0.0.0.0:8080 or 127.0.0.1:0.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Serve this bundle too (host/repository:tag or @sha256:..., under the file's [trust]),
    /// as if declared `[bundles.NAME]`; NAME=REF names it (default: the repository's last part).
    #[arg(long = "bundle", value_name = "[NAME=]REF")]
    bundles: Vec<String>,
    /// Join a fleet: take assigned bundles from this NATS server (e.g. nats://127.0.0.1:4222).
    #[arg(long, value_name = "URL", env = "EIR_FLEET")]
    fleet: Option<String>,
    /// This device's id in the fleet [default: the host name].
    #[arg(long, value_name = "ID", requires = "fleet")]
    device_id: Option<String>,
    /// This device's labels, which rollouts select on (e.g. zone=a,hw=x86).
    #[arg(long, value_name = "K=V,...", default_value = "", requires = "fleet")]
    labels: String,
    /// How often the device reports to the fleet.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, requires = "fleet")]
    heartbeat: std::time::Duration,
}

/// Runs `eir serve`.
pub async fn serve(args: ServeArgs, global: &GlobalOptions) -> anyhow::Result<ExitCode> {
    let fleet = match args.fleet {
        None => None,
        Some(nats) => {
            let device_id = match args.device_id {
                Some(id) => id,
                None => std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default(),
            };
            crate::fleet::check_name("device id", &device_id)?;
            let state_dir = crate::engine::default_cache_dir()
                .ok_or_else(|| anyhow::anyhow!("no cache directory for the fleet state (set EIR_CACHE_DIR)"))?
                .join("fleet");
            Some(crate::fleet::agent::AgentOptions {
                nats,
                device_id,
                labels: crate::fleet::agent::parse_labels(&args.labels)?,
                heartbeat: args.heartbeat,
                config: args.config.clone(),
                state_dir,
            })
        }
    };
    let mut bundles = std::collections::BTreeMap::new();
    for b in &args.bundles {
        let (name, reference) = match b.split_once('=') {
            Some((name, reference)) => (name.to_string(), reference.to_string()),
            None => {
                let parsed = crate::bundle::registry::reference(b)?;
                (parsed.repository().rsplit('/').next().unwrap_or("bundle").to_string(), b.clone())
            }
        };
        let decl = crate::config::BundleDecl::from_registry(reference);
        if bundles.insert(name.clone(), decl).is_some() {
            anyhow::bail!("two --bundle arguments are named `{name}` (name them: --bundle NAME=REF)");
        }
    }
    let runtime = Runtime::new(global.engine_config())?;
    gateway::serve(runtime, &args.config, args.listen, bundles, fleet).await?;
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `eir key`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Make a new random API key; prints it once, and the hash the configuration stores.
    New,
    /// Print the SHA-256 of an existing key, as `keys_sha256` wants it.
    Hash {
        /// The key.
        key: String,
    },
}

/// Runs `eir key`.
pub fn key(args: KeyArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        KeyCommand::New => {
            let mut raw = [0u8; 24];
            getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
            let key = format!("eir_{}", hex::encode(raw));
            println!("key:         {key}");
            println!("keys_sha256: \"{}\"", key_hash(&key));
            eprintln!("(the key is shown once; the configuration keeps only its hash)");
        }
        KeyCommand::Hash { key } => println!("{}", key_hash(&key)),
    }
    Ok(ExitCode::SUCCESS)
}
