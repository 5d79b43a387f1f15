//! What a plugin may touch. Nothing is granted by default: a plugin sees no files, no
//! environment, no arguments and no network unless its configuration says so.
//!
//! [`Grants`] turns into the WASI context of each call; the network stays denied at the
//! policy level even though every WASI 0.2 interface is linked, so guests whose toolchains
//! import `wasi:sockets` or `wasi:http` still load, and still reach nothing.

mod stdio;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::nn::NnGrants;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

pub use stdio::{LogStream, OutputTail};

/// A host directory made visible to the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// The directory on the host.
    pub host: PathBuf,
    /// Where the guest sees it (e.g. `/data`).
    pub guest: String,
    /// Whether the guest may create, change and delete files in it.
    #[serde(default)]
    pub writable: bool,
}

/// Parses `HOST::GUEST[:ro|:rw]`; read-only unless `:rw` is given.
impl FromStr for DirGrant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, rest) = s.split_once("::").ok_or_else(|| format!("`{s}`: expected HOST::GUEST[:ro|:rw]"))?;
        let (guest, writable) = match rest.rsplit_once(':') {
            Some((guest, "ro")) => (guest, false),
            Some((guest, "rw")) => (guest, true),
            _ => (rest, false),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(format!("`{s}`: both HOST and GUEST paths are needed"));
        }
        Ok(Self { host: host.into(), guest: guest.to_string(), writable })
    }
}

/// Where a guest's stdout and stderr go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stdio {
    /// Line by line into `tracing`, tagged with the plugin's name (the default for plugins
    /// serving requests).
    #[default]
    Log,
    /// Straight through to the host process's stdout/stderr (`eir run` of a command).
    Inherit,
}

/// The capabilities granted to one plugin.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Grants {
    /// Preopened directories.
    pub dirs: Vec<DirGrant>,
    /// Environment variables, as (name, value).
    pub env: Vec<(String, String)>,
    /// Arguments (`argv`), program name first.
    pub args: Vec<String>,
    /// Whether TCP, UDP and name lookups are allowed. Outgoing `wasi:http` stays denied.
    pub network: bool,
    /// Where stdout and stderr go.
    pub stdio: Stdio,
    /// Whether the guest may read the host's stdin (commands under `eir run` only).
    pub stdin: bool,
    /// Models the plugin may load through wasi-nn.
    pub nn: NnGrants,
}

/// A grant that cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// A preopened directory could not be opened.
    #[error("cannot grant directory {host} as {guest}: {message}")]
    Dir {
        /// The host path.
        host: String,
        /// The guest path.
        guest: String,
        /// Why.
        message: String,
    },
}

impl Grants {
    /// Checks that every granted directory can be opened, so that a bad grant fails when the
    /// plugin is loaded rather than on its first request.
    pub fn check(&self) -> Result<(), GrantError> {
        for dir in &self.dirs {
            if !dir.host.is_dir() {
                return Err(GrantError::Dir {
                    host: dir.host.display().to_string(),
                    guest: dir.guest.clone(),
                    message: "not a directory".into(),
                });
            }
        }
        Ok(())
    }

    /// Builds the WASI context of one call for the plugin `plugin`. When stderr goes to the
    /// log, its last lines are also kept in the returned tail, to explain a trap.
    pub fn wasi_ctx(&self, plugin: &Arc<str>) -> Result<(WasiCtx, Option<OutputTail>), GrantError> {
        let (mut builder, tail) = self.wasi_builder(plugin)?;
        Ok((builder.build(), tail))
    }

    /// The same context for a core module (WASI preview 1).
    pub fn wasi_p1_ctx(&self, plugin: &Arc<str>) -> Result<(WasiP1Ctx, Option<OutputTail>), GrantError> {
        let (mut builder, tail) = self.wasi_builder(plugin)?;
        Ok((builder.build_p1(), tail))
    }

    fn wasi_builder(&self, plugin: &Arc<str>) -> Result<(WasiCtxBuilder, Option<OutputTail>), GrantError> {
        let mut builder = WasiCtxBuilder::new();
        builder.args(&self.args).envs(&self.env);
        for dir in &self.dirs {
            let perms = if dir.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
            builder.preopened_dir(&dir.host, &dir.guest, perms).map_err(|e| GrantError::Dir {
                host: dir.host.display().to_string(),
                guest: dir.guest.clone(),
                message: format!("{e:#}"),
            })?;
        }
        let tail = match self.stdio {
            Stdio::Inherit => {
                builder.inherit_stdout().inherit_stderr();
                None
            }
            Stdio::Log => {
                let tail = OutputTail::default();
                builder.stdout(LogStream::new(plugin.clone(), "stdout", None)).stderr(LogStream::new(
                    plugin.clone(),
                    "stderr",
                    Some(tail.clone()),
                ));
                Some(tail)
            }
        };
        if self.stdin {
            builder.inherit_stdin();
        }
        builder.allow_tcp(self.network).allow_udp(self.network).allow_ip_name_lookup(self.network);
        if self.network {
            builder.inherit_network();
        }
        Ok((builder, tail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_grants_parse_read_only_by_default() {
        let g: DirGrant = "/srv/models::/models".parse().unwrap();
        assert_eq!(g, DirGrant { host: "/srv/models".into(), guest: "/models".into(), writable: false });
        let g: DirGrant = "./out::/out:rw".parse().unwrap();
        assert!(g.writable);
        assert_eq!(g.guest, "/out");
        let g: DirGrant = "a::b:ro".parse().unwrap();
        assert!(!g.writable);
        assert!("/only-host".parse::<DirGrant>().is_err());
        assert!("::/guest".parse::<DirGrant>().is_err());
    }

    #[test]
    fn missing_directory_is_caught_at_check() {
        let grants = Grants { dirs: vec!["/definitely/not/here::/x".parse().unwrap()], ..Grants::default() };
        let err = grants.check().unwrap_err();
        assert!(err.to_string().contains("/definitely/not/here"), "{err}");
    }
}
