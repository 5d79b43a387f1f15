//! Models by name: declarations (from the config file or `--model NAME=PATH`), loaded once on
//! first use and shared (`Arc`) by every plugin instance and tenant; and the catalog of pinned
//! packages that ship real weights (see [`fetch`]).

pub mod fetch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::nn::NnError;
use crate::nn::backend::{self, Model, Source, Target};
use crate::scheduler::{BatchPolicy, Scheduler};

/// One declared model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDecl {
    /// A model directory (e.g. `config.json` + `model.safetensors`) or a single model file.
    pub path: PathBuf,
    /// Expected family (`bert`, ...); checked against what the files say when given.
    #[serde(default)]
    pub family: Option<String>,
    /// Where it runs.
    #[serde(default)]
    pub target: Target,
    /// How its computes batch (`max_batch`, `max_delay`).
    #[serde(default)]
    pub batch: BatchPolicy,
    /// How a language model (`gguf`) runs its sequences; `None`: the defaults.
    #[serde(default)]
    pub llm: Option<crate::llm::Settings>,
}

/// `NAME=PATH` (with an optional `@gpu` suffix), as given to `--model`.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedModel {
    /// The name plugins load it by.
    pub name: String,
    /// Its declaration.
    pub decl: ModelDecl,
}

impl FromStr for NamedModel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected NAME=PATH"))?;
        let (path, target) = match rest.rsplit_once('@') {
            Some((path, "gpu")) => (path, Target::Gpu),
            Some((path, "cpu")) => (path, Target::Cpu),
            _ => (rest, Target::Cpu),
        };
        if name.is_empty() || path.is_empty() {
            return Err(format!("`{s}`: expected NAME=PATH"));
        }
        Ok(Self {
            name: name.to_string(),
            decl: ModelDecl { path: path.into(), family: None, target, batch: BatchPolicy::default(), llm: None },
        })
    }
}

/// A model that is loaded at most once, on first use.
type Slot = Arc<OnceCell<Arc<dyn Model>>>;

/// The models a host serves. Cheap to share (`Arc`).
pub struct Registry {
    decls: HashMap<String, ModelDecl>,
    loaded: Mutex<HashMap<String, Slot>>,
    scheduler: Scheduler,
}

impl Registry {
    /// A registry of `decls`, computing through `scheduler`.
    pub fn new(decls: impl IntoIterator<Item = (String, ModelDecl)>, scheduler: Scheduler) -> Self {
        Self { decls: decls.into_iter().collect(), loaded: Mutex::default(), scheduler }
    }

    /// An empty registry.
    pub fn empty() -> Self {
        Self::new([], Scheduler::for_this_machine())
    }

    /// A registry of `decls` that keeps the models `previous` already loaded for unchanged
    /// declarations (a configuration reload does not reload them).
    pub fn carrying_over(decls: impl IntoIterator<Item = (String, ModelDecl)>, previous: &Registry) -> Self {
        let next = Self::new(decls, previous.scheduler.clone());
        if let (Ok(old), Ok(mut new)) = (previous.loaded.lock(), next.loaded.lock()) {
            for (name, slot) in old.iter() {
                if previous.decls.get(name) == next.decls.get(name) {
                    new.insert(name.clone(), slot.clone());
                }
            }
        }
        next
    }

    /// The scheduler every compute on these models goes through.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// How the model called `name` batches (the default for undeclared names).
    pub fn batch_policy(&self, name: &str) -> BatchPolicy {
        self.decls.get(name).map(|d| d.batch).unwrap_or_default()
    }

    /// The declared names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.decls.keys().map(String::as_str)
    }

    /// The declaration of `name`.
    pub fn decl(&self, name: &str) -> Option<&ModelDecl> {
        self.decls.get(name)
    }

    /// The model called `name`, loading it on the compute pool the first time. Concurrent
    /// first calls wait for one load; a failed load is retried by the next call.
    pub async fn get(&self, name: &str) -> Result<Arc<dyn Model>, NnError> {
        let decl = self
            .decls
            .get(name)
            .ok_or_else(|| NnError::not_found(format!("no model named `{name}` is registered")))?
            .clone();
        let cell = {
            let mut loaded = self.loaded.lock().map_err(|_| NnError::runtime("model registry lock poisoned"))?;
            loaded.entry(name.to_string()).or_default().clone()
        };
        let model = cell
            .get_or_try_init(|| async {
                let path = decl.path.clone();
                let name = name.to_string();
                tracing::info!(model = %name, path = %path.display(), "loading model");
                let started = Instant::now();
                // A shared load: no caller's deadline applies, and a caller that stops waiting
                // cancels only its own wait (`get_or_try_init` keeps the load for the next).
                let model = self
                    .scheduler
                    .loads()
                    .run(&Default::default(), move || -> Result<Arc<dyn Model>, NnError> {
                        if let Some(file) = crate::llm::model::gguf_at(&path) {
                            let size = std::fs::metadata(&file).map_or(0, |m| m.len());
                            let meter =
                                crate::nn::meter::Meter::for_load(backend::load_budget(size), Default::default(), None);
                            let llm = crate::llm::Llm::load(&file, decl.llm.clone().unwrap_or_default(), &meter)?;
                            return Ok(Arc::new(llm));
                        }
                        backend::load(Source::Path(&path), decl.target)
                    })
                    .await?;
                if let Some(family) = &decl.family
                    && family != model.family()
                {
                    return Err(NnError::invalid_encoding(format!(
                        "model `{name}` was declared as `{family}` but its files are `{}`",
                        model.family()
                    )));
                }
                tracing::info!(model = %name, family = model.family(), elapsed = ?started.elapsed(), "model loaded");
                Ok(model)
            })
            .await?;
        Ok(model.clone())
    }

    /// Loads every declared model now (a server does this at start, so the first request
    /// does not pay for it).
    /// `name`'s model if it is loaded already (never loads it).
    pub fn loaded(&self, name: &str) -> Option<Arc<dyn Model>> {
        self.loaded.lock().ok()?.get(name)?.get().cloned()
    }

    pub async fn preload(&self) -> Result<(), NnError> {
        let names: Vec<String> = self.decls.keys().cloned().collect();
        for name in names {
            self.get(&name).await.map_err(|e| NnError { message: format!("model `{name}`: {}", e.message), ..e })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_flags_parse() {
        let m: NamedModel = "minilm=models/minilm".parse().unwrap();
        assert_eq!(m.name, "minilm");
        assert_eq!(m.decl.path, PathBuf::from("models/minilm"));
        assert_eq!(m.decl.target, Target::Cpu);
        let m: NamedModel = "big=/srv/m@gpu".parse().unwrap();
        assert_eq!(m.decl.target, Target::Gpu);
        assert!("nopath".parse::<NamedModel>().is_err());
        assert!("=x".parse::<NamedModel>().is_err());
    }

    #[tokio::test]
    async fn unknown_and_broken_models_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"bert\"}").unwrap();
        let registry = Registry::new(
            [(
                "broken".to_string(),
                ModelDecl {
                    path: dir.path().into(),
                    family: None,
                    target: Target::Cpu,
                    batch: BatchPolicy::default(),
                    llm: None,
                },
            )],
            Scheduler::for_this_machine(),
        );
        let err = registry.get("nope").await.err().unwrap();
        assert_eq!(crate::nn::code_name(err.code), "not-found");
        let err = registry.get("broken").await.err().unwrap();
        assert!(!err.message.is_empty());
        // Failed loads are not cached as successes.
        assert!(registry.get("broken").await.is_err());
    }
}
