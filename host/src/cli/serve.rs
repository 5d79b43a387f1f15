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
}

/// Runs `eir serve`.
pub async fn serve(args: ServeArgs, global: &GlobalOptions) -> anyhow::Result<ExitCode> {
    let runtime = Runtime::new(global.engine_config())?;
    gateway::serve(runtime, &args.config, args.listen).await?;
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
