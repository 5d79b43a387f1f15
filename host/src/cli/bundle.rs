//! `eir bundle`: package plugins and models as OCI artifacts, sign, push, pull and check them out.

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
        /// Require a signature by this public key (PEM; repeatable: any of them).
        #[arg(long = "key", value_name = "FILE")]
        keys: Vec<PathBuf>,
    },
    /// Make a signing key pair: PREFIX.key (PKCS#8 PEM, keep it secret) and PREFIX.pub.
    Keygen {
        /// Path prefix of the two files.
        prefix: PathBuf,
    },
    /// Sign a pushed bundle as cosign does (stored next to it as `sha256-<hex>.sig`).
    Sign {
        /// host[:port]/repository:tag or @sha256:...
        reference: String,
        /// The private key (PEM).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Check that a pushed bundle carries a signature by one of the keys.
    Verify {
        /// host[:port]/repository:tag or @sha256:...
        reference: String,
        /// A trusted public key (PEM; repeatable).
        #[arg(long = "key", value_name = "FILE", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Pull a signed bundle and check it out into a directory, ready to serve as
    /// `[bundles.NAME] dir = "DIR"`: a KServe storage initializer (`eir bundle install
    /// eir://host/repo@sha256:... /mnt/models`). Registry outages are retried with backoff.
    Install {
        /// host[:port]/repository:tag or @sha256:..., optionally prefixed `eir://`.
        source: String,
        /// The directory (created; files already there are kept).
        dir: PathBuf,
        /// A trusted public key (PEM; repeatable); also from EIR_TRUST_KEYS (paths separated
        /// by `:`) and EIR_TRUST_KEY_PEM (one key's PEM text). The signature is checked
        /// before any blob is fetched.
        #[arg(long = "key", value_name = "FILE")]
        keys: Vec<PathBuf>,
        /// Install without checking a signature.
        #[arg(long)]
        insecure_no_verify: bool,
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
            println!(
                "pushed {name} to {target}: {} blobs, {} bytes sent, {} already there",
                t.blobs, t.bytes, t.skipped
            );
        }
        BundleCommand::Keygen { prefix } => {
            let (private, public) = bundle::sign::keygen()?;
            let key = prefix.with_extension("key");
            write_private(&key, &private)?;
            std::fs::write(prefix.with_extension("pub"), public)?;
            println!("{} {}", key.display(), prefix.with_extension("pub").display());
        }
        BundleCommand::Sign { reference, key } => {
            let pem = std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
            let key = bundle::sign::signing_key(&pem)?;
            let r = registry::reference(&reference)?;
            let digest = bundle::sign::sign(&r, &key, &registry::Auth::from_env()).await?;
            println!("signed {reference} {digest}");
        }
        BundleCommand::Verify { reference, keys } => {
            let keys = read_keys(&keys)?;
            let r = registry::reference(&reference)?;
            let auth = registry::Auth::from_env();
            let digest = bundle::sign::remote_digest(&r, &auth).await?;
            bundle::sign::verify(&r, &digest, &keys, &auth).await?;
            println!("verified {reference} {digest}");
        }
        BundleCommand::Pull { source, name, keys } => {
            let reference = registry::reference(&source)?;
            let local = name.unwrap_or_else(|| {
                let repo = reference.repository().rsplit('/').next().unwrap_or("bundle").to_string();
                format!("{repo}:{}", reference.tag().or(reference.digest()).unwrap_or("latest"))
            });
            let keys = read_keys(&keys)?;
            let trusted = (!keys.is_empty()).then_some(keys.as_slice());
            let (digest, t) = registry::pull(&store, &reference, &local, &registry::Auth::from_env(), trusted)
                .await
                .with_context(|| format!("pulling {source}"))?;
            println!("{local} {digest}: {} blobs, {} bytes fetched, {} already here", t.blobs, t.bytes, t.skipped);
        }
        BundleCommand::Install { source, dir, mut keys, insecure_no_verify } => {
            let source = source.strip_prefix("eir://").unwrap_or(&source).to_string();
            if let Some(paths) = std::env::var_os("EIR_TRUST_KEYS") {
                keys.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
            }
            // A key given inline (a Kubernetes ConfigMap entry as an environment variable).
            let _inline = match std::env::var("EIR_TRUST_KEY_PEM") {
                Ok(pem) if !pem.trim().is_empty() => {
                    let mut file = tempfile::NamedTempFile::new().context("writing EIR_TRUST_KEY_PEM")?;
                    std::io::Write::write_all(&mut file, pem.as_bytes())?;
                    keys.push(file.path().to_path_buf());
                    Some(file)
                }
                _ => None,
            };
            let reference = registry::reference(&source)?;
            let repository = format!("{}/{}", reference.registry(), reference.repository());
            let mode = match (keys.is_empty(), insecure_no_verify) {
                (true, false) => anyhow::bail!(
                    "refusing to install {source} unverified: give --key (or EIR_TRUST_KEYS), or --insecure-no-verify"
                ),
                (_, true) => crate::config::TrustMode::Off,
                (false, false) => crate::config::TrustMode::Enforce,
            };
            let trust =
                crate::config::TrustDecl { mode, scopes: vec![crate::config::TrustScope { prefix: repository, keys }] };
            let (digest, t) = bundle::serve::fetch(&store, &trust, &source, "installed").await?;
            tracing::info!(blobs = t.blobs, bytes = t.bytes, already_here = t.skipped, "pulled");
            let fragment = bundle::checkout(&store, digest.as_str(), &dir)?;
            tracing::info!(source = %source, digest = %digest, dir = %dir.display(), "installed");
            println!("{}", fragment.display());
        }
        BundleCommand::Checkout { bundle: name, dir } => {
            let fragment = bundle::checkout(&store, &name, &dir)?;
            println!("{}", fragment.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_keys(files: &[PathBuf]) -> anyhow::Result<Vec<p256::ecdsa::VerifyingKey>> {
    files
        .iter()
        .map(|f| {
            let pem = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            Ok(bundle::sign::verifying_key(&pem)?)
        })
        .collect()
}

/// Writes a private key readable by its owner only.
fn write_private(path: &std::path::Path, pem: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(pem.as_bytes())?;
    Ok(())
}
