//! `eir bundle`: package plugins and models as signed-ready OCI artifacts, push and pull them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::bundle::{self, BuildOptions, Store, registry};

/// Arguments of `eir bundle`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    #[command(subcommand)]
    command: BundleCommand,
    /// The local bundle store (an OCI image layout) [default: <cache dir>/bundles].
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Package a configuration's plugins and models (their files, granted directories and a
    /// configuration fragment) into the store as NAME:VERSION.
    Build {
        /// The configuration to package.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The bundle's name and version, NAME:VERSION.
        #[arg(short, long, value_name = "NAME:VERSION")]
        tag: String,
        /// Only this plugin, with the models it is granted (repeatable).
        #[arg(long = "plugin", value_name = "NAME")]
        plugins: Vec<String>,
        /// Only this model too (repeatable; alone, a model-only bundle).
        #[arg(long = "model", value_name = "NAME")]
        models: Vec<String>,
    },
    /// Show a bundle of the store: its config and layers, as JSON.
    Inspect {
        /// NAME:VERSION or a manifest digest.
        bundle: String,
    },
    /// Push a bundle to a registry (credentials from EIR_REGISTRY_USER / EIR_REGISTRY_PASSWORD).
    Push {
        /// NAME:VERSION or a manifest digest in the store.
        bundle: String,
        /// Where to: host[:port]/repository:tag (plain HTTP only for loopback registries).
        target: String,
    },
    /// Pull a bundle from a registry into the store (blobs already there are skipped, every
    /// blob is verified against its digest).
    Pull {
        /// host[:port]/repository:tag or @sha256:...
        source: String,
        /// The name to give it in the store [default: the repository's last part and the tag].
        #[arg(long)]
        name: Option<String>,
    },
    /// Materialise a bundle of the store into a directory, ready to serve; prints the path of
    /// its configuration fragment.
    Checkout {
        /// NAME:VERSION or a manifest digest.
        bundle: String,
        /// The directory.
        dir: PathBuf,
    },
}

/// Runs `eir bundle`.
pub async fn bundle(args: BundleArgs, global: &super::GlobalOptions) -> anyhow::Result<ExitCode> {
    let root = match args.store.or_else(|| global.cache_dir.clone().or_else(crate::engine::default_cache_dir)) {
        Some(dir) if dir.ends_with("bundles") => dir,
        Some(dir) => dir.join("bundles"),
        None => anyhow::bail!("no bundle store: give --store"),
    };
    let store = Store::open(&root)?;
    match args.command {
        BundleCommand::Build { config, tag, plugins, models } => {
            let Some((name, version)) = tag.rsplit_once(':').filter(|(n, v)| !n.is_empty() && !v.is_empty()) else {
                anyhow::bail!("--tag must be NAME:VERSION, not `{tag}`");
            };
            let (name, version) = (name.to_string(), version.to_string());
            let opts = BuildOptions { config, name, version, plugins, models };
            let built = bundle::build(&store, &opts)?;
            let bytes: u64 = built.manifest.layers.iter().map(|l| l.size).sum();
            println!(
                "{}:{} {} ({} layers, {bytes} bytes) in {}",
                opts.name,
                opts.version,
                built.digest,
                built.manifest.layers.len(),
                root.display()
            );
        }
        BundleCommand::Inspect { bundle: name } => {
            let built = bundle::open(&store, &name)?;
            let out = serde_json::json!({
                "digest": built.digest.as_str(),
                "config": built.config,
                "layers": built.manifest.layers,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        BundleCommand::Push { bundle: name, target } => {
            let reference = registry::reference(&target)?;
            let t = registry::push(&store, &name, &reference, &registry::Auth::from_env())
                .await
                .with_context(|| format!("pushing {name} to {target}"))?;
            println!("pushed {name} to {target}: {} blobs, {} bytes", t.blobs, t.bytes);
        }
        BundleCommand::Pull { source, name } => {
            let reference = registry::reference(&source)?;
            let local = name.unwrap_or_else(|| {
                let repo = reference.repository().rsplit('/').next().unwrap_or("bundle").to_string();
                format!("{repo}:{}", reference.tag().or(reference.digest()).unwrap_or("latest"))
            });
            let (digest, t) = registry::pull(&store, &reference, &local, &registry::Auth::from_env())
                .await
                .with_context(|| format!("pulling {source}"))?;
            println!("{local} {digest}: {} blobs, {} bytes fetched, {} already here", t.blobs, t.bytes, t.skipped);
        }
        BundleCommand::Checkout { bundle: name, dir } => {
            let fragment = bundle::checkout(&store, &name, &dir)?;
            println!("{}", fragment.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
