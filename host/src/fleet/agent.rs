//! The device agent (`eir serve --fleet nats://... --device-id ID --labels k=v,...`): watches
//! the device's assignment, pulls, verifies and stages the bundle, runs the health gate
//! (readiness: models loaded and plugins compiled and described; then every smoke request the
//! plugins declare), swaps, and reports its state and heartbeats.
//!
//! Serving never depends on NATS: the gateway runs on its own, the agent only changes what it
//! serves through [`Gateway::apply`]. While NATS is unreachable the device keeps serving its
//! last good version and catches up on reconnect (assignments are state in a KV bucket, read
//! again at every heartbeat, never messages that could be missed). The version it replaced
//! stays built in memory, so a rollback swaps it back without loading or compiling anything;
//! the price is that memory for models the two versions do not share.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{Action, Assignment, Bus, DeviceRecord, DeviceState, Event};
use crate::bundle::BundleError;
use crate::config::BundleDecl;
use crate::gateway::{Gateway, Snapshot};

/// The name the assigned bundle is served under (as if `[bundles.fleet]`).
pub const BUNDLE_NAME: &str = "fleet";
/// What the agent's pulls are named in the bundle store (`fleet/REFERENCE`).
pub const FLEET_TAG: &str = "fleet";
/// Unreachable blobs younger than this are left alone by the store's garbage collection.
const GC_MIN_AGE: Duration = Duration::from_secs(600);

/// Longest wait between pull attempts while the registry is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a device joins its fleet.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The NATS server (`nats://host:4222`).
    pub nats: String,
    /// This device's id.
    pub device_id: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// How often it reports.
    pub heartbeat: Duration,
    /// The configuration file (its `[trust]` policy applies to assigned bundles).
    pub config: PathBuf,
    /// Where it remembers its last good bundle across restarts.
    pub state_dir: PathBuf,
}

/// What a device remembers across restarts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Saved {
    bundle: Option<String>,
    previous: Option<String>,
    assignment: Option<String>,
    state: DeviceState,
}

impl AgentOptions {
    fn state_file(&self) -> PathBuf {
        self.state_dir.join(format!("{}.json", self.device_id))
    }

    fn saved(&self) -> Saved {
        std::fs::read(self.state_file()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// The bundles the device last served successfully, to start with.
    pub fn last_good(&self) -> BTreeMap<String, BundleDecl> {
        assigned(self.saved().bundle)
    }
}

/// Parses `zone=a,hw=x86`.
pub fn parse_labels(s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').with_context(|| format!("label `{pair}`: expected KEY=VALUE"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

fn assigned(bundle: Option<String>) -> BTreeMap<String, BundleDecl> {
    bundle.map(|r| (BUNDLE_NAME.to_string(), BundleDecl::from_registry(r))).into_iter().collect()
}

/// A version built and swapped out, kept for an instant rollback.
struct Kept {
    snapshot: Arc<Snapshot>,
    /// The bundles it was built for.
    bundles: BTreeMap<String, BundleDecl>,
    /// The gateway's generation after it was swapped out: any other reload since makes it
    /// stale.
    generation: u64,
}

/// The device agent.
pub struct Agent {
    options: AgentOptions,
    gateway: Arc<Gateway>,
    record: Mutex<DeviceRecord>,
    /// The fleet's buckets, once opened (opened again if the server lost them).
    bus: Mutex<Option<Bus>>,
    /// One record write at a time, so an older state never overwrites a newer one.
    reporting: tokio::sync::Mutex<()>,
    /// The version the last swap replaced.
    kept: tokio::sync::Mutex<Option<Kept>>,
}

impl Agent {
    /// An agent for the gateway serving at `address`, which started with the `serving`
    /// bundles (the saved ones, unless they could not be loaded).
    pub fn new(
        options: AgentOptions,
        gateway: Arc<Gateway>,
        address: String,
        serving: &BTreeMap<String, BundleDecl>,
    ) -> Arc<Self> {
        let saved = options.saved();
        let mut record = DeviceRecord {
            id: options.device_id.clone(),
            labels: options.labels.clone(),
            address,
            eir_version: env!("CARGO_PKG_VERSION").into(),
            state: saved.state,
            assignment: saved.assignment,
            bundle: saved.bundle,
            previous: saved.previous,
            ..Default::default()
        };
        if assigned(record.bundle.clone()) != *serving {
            // The saved bundle did not load at start: say so, and take the assignment up again.
            record.state = DeviceState::Failed;
            record.error = Some("the last good bundle could not be served at start".into());
            record.assignment = None;
            record.bundle = serving.get(BUNDLE_NAME).and_then(|b| b.reference.clone());
        }
        Arc::new(Self {
            options,
            gateway,
            record: Mutex::new(record),
            bus: Mutex::new(None),
            reporting: tokio::sync::Mutex::new(()),
            kept: tokio::sync::Mutex::new(None),
        })
    }

    fn bus(&self) -> Option<Bus> {
        self.bus.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self) -> std::sync::MutexGuard<'_, DeviceRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Heartbeats and assignment checks until the process ends; assignments are applied one at
    /// a time on their own task, so a long pull never silences the heartbeats.
    pub async fn run(self: Arc<Self>) {
        let client = match super::connect(&self.options.nats).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "fleet agent disabled: cannot use the NATS address");
                return;
            }
        };
        let (tx, mut rx) = tokio::sync::watch::channel::<Option<Assignment>>(None);
        let applier = self.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let next = rx.borrow_and_update().clone();
                if let Some(a) = next {
                    // A newer assignment supersedes one still being taken up (a stuck pull, a
                    // rollback arriving mid-apply): the older is abandoned; the running version
                    // is untouched until a swap.
                    let mut newer = rx.clone();
                    tokio::select! {
                        _ = applier.take_up(a.clone()) => {}
                        _ = newer.wait_for(|n| n.as_ref() != Some(&a)) => {
                            tracing::info!(assignment = %a.id(), "superseded before it was taken up");
                        }
                    }
                }
            }
        });
        let mut reachable = true;
        let mut failures = 0u32;
        loop {
            if self.bus().is_none() {
                match Bus::open(client.clone()).await {
                    Ok(bus) => {
                        *self.bus.lock().unwrap_or_else(|e| e.into_inner()) = Some(bus);
                        tracing::info!(nats = %self.options.nats, device = %self.options.device_id, "joined the fleet");
                    }
                    Err(e) => tracing::debug!(error = %format!("{e:#}"), "fleet not reachable yet"),
                }
            }
            if let Some(bus) = self.bus() {
                let ok = self.report(&bus).await.is_ok();
                if ok {
                    failures = 0;
                    match super::get_json::<Assignment>(&bus.assign, &self.options.device_id).await {
                        Ok(Some((a, _))) if tx.borrow().as_ref() != Some(&a) => {
                            let _ = tx.send(Some(a));
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %format!("{e:#}"), "reading the assignment"),
                    }
                } else {
                    failures += 1;
                    // Connected but failing: the server may have lost the fleet's buckets.
                    let connected = client.connection_state() == async_nats::connection::State::Connected;
                    if connected && failures >= 3 {
                        *self.bus.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                }
                if ok != reachable {
                    reachable = ok;
                    match ok {
                        true => tracing::info!("fleet reachable again; catching up"),
                        false => tracing::warn!("fleet unreachable; serving the last good version meanwhile"),
                    }
                }
            }
            tokio::time::sleep(self.options.heartbeat).await;
        }
    }

    /// Writes the device's record (a heartbeat).
    async fn report(&self, bus: &Bus) -> anyhow::Result<()> {
        let _one = self.reporting.lock().await;
        let record = {
            let mut r = self.record();
            r.seq += 1;
            r.serving = self.gateway.serving().summary();
            r.clone()
        };
        super::put_json(&bus.devices, &self.options.device_id, &record).await.map(|_| ())
    }

    /// Sets the state (and what goes with it), reports it and records the event.
    async fn set(&self, state: DeviceState, a: &Assignment, outcome: &str, detail: String) {
        {
            let mut r = self.record();
            r.state = state;
            r.assignment = Some(a.id());
            r.error = (state == DeviceState::Failed).then(|| super::truncated(detail.clone()));
        }
        if state == DeviceState::Failed {
            // Not retried after a restart either.
            self.save();
        }
        if let Some(bus) = self.bus() {
            if let Err(e) = self.report(&bus).await {
                tracing::debug!(error = %format!("{e:#}"), "reporting the state");
            }
            bus.event(Event {
                at_ms: super::now_ms(),
                who: format!("device:{}", self.options.device_id),
                what: state.as_str().into(),
                group: Some(a.group.clone()),
                device: Some(self.options.device_id.clone()),
                bundle: a.bundle.clone(),
                outcome: outcome.into(),
                detail,
            })
            .await;
        }
    }

    fn save(&self) {
        let r = self.record().clone();
        let saved = Saved { bundle: r.bundle, previous: r.previous, assignment: r.assignment, state: r.state };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.options.state_dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(&self.options.state_dir)?;
            std::io::Write::write_all(&mut tmp, &serde_json::to_vec(&saved).unwrap_or_default())?;
            tmp.persist(self.options.state_file()).map_err(|e| e.error)?;
            Ok(())
        };
        if let Err(e) = write() {
            tracing::warn!(error = %e, "could not remember the served bundle across restarts");
        }
    }

    /// Takes assignment `a` up: pull, verify, stage, gate, swap (or swap back, for a rollback).
    async fn take_up(&self, a: Assignment) {
        let done = {
            let r = self.record();
            r.assignment.as_deref() == Some(a.id().as_str())
                && matches!(r.state, DeviceState::Active | DeviceState::RolledBack | DeviceState::Failed)
        };
        if done {
            return;
        }
        let finished = match a.action {
            Action::Apply => DeviceState::Active,
            Action::Rollback => DeviceState::RolledBack,
        };
        let mut moved = String::new();
        let target = match &a.bundle {
            None => None,
            Some(reference) => {
                self.set(DeviceState::Pulling, &a, "ok", reference.clone()).await;
                match self.pull(reference).await {
                    Ok((pinned, transfer)) => {
                        moved = transfer;
                        Some(pinned)
                    }
                    Err(e) => {
                        self.set(DeviceState::Failed, &a, "failed", format!("{e:#}")).await;
                        return;
                    }
                }
            }
        };
        let wanted = assigned(target.clone());
        let before = self.gateway.assigned().await;
        if wanted == before {
            // Already serving it (a rollback to where the device never left).
            self.finish(finished, &a, target, "already serving it").await;
            return;
        }
        // A rollback to the version still held in memory (and nothing reloaded since): swap it
        // back.
        let mut kept = self.kept.lock().await;
        let current = self.gateway.generation();
        if a.action == Action::Rollback
            && let Some(k) = kept.take_if(|k| k.bundles == wanted && k.generation == current)
        {
            let swapped = self.gateway.restore(k.snapshot, k.bundles).await;
            *kept = Some(Kept { snapshot: swapped.previous, bundles: before, generation: swapped.generation });
            drop(kept);
            self.finish(finished, &a, target, "swapped back to the kept version").await;
            return;
        }
        self.set(DeviceState::Verifying, &a, "ok", format!("{moved}; checking out and validating")).await;
        let staged = &a;
        let gate = |snapshot: Arc<Snapshot>| async move {
            self.set(DeviceState::Staged, staged, "ok", "built beside the running version; health gate".into()).await;
            let passed = crate::gateway::health::smoke(&snapshot).await?;
            tracing::info!(smoke_requests = passed, "health gate passed");
            Ok(())
        };
        match self.gateway.apply(Some(wanted), gate).await {
            Ok(swapped) => {
                *kept = Some(Kept { snapshot: swapped.previous, bundles: before, generation: swapped.generation });
                drop(kept);
                self.finish(finished, &a, target, "swapped in").await;
            }
            Err(e) => {
                drop(kept);
                self.set(DeviceState::Failed, &a, "failed", format!("{e:#}")).await;
            }
        }
    }

    async fn finish(&self, state: DeviceState, a: &Assignment, bundle: Option<String>, detail: &str) {
        let keep = {
            let mut r = self.record();
            if r.bundle != bundle {
                r.previous = std::mem::replace(&mut r.bundle, bundle);
            }
            r.state = state;
            r.assignment = Some(a.id());
            r.error = None;
            [r.bundle.clone(), r.previous.clone()]
        };
        // Remembered before anything else is awaited: what runs now is what a restart serves.
        self.save();
        self.set(state, a, "ok", detail.into()).await;
        let cleaned = tokio::task::spawn_blocking(move || collect(&keep)).await;
        if let Ok(Err(e)) = cleaned {
            tracing::warn!(error = %format!("{e:#}"), "cleaning the bundle store failed");
        }
    }

    /// Pulls `reference` under the configuration's trust policy, retrying while the registry is
    /// unreachable (the caller abandons it when a newer assignment comes); the pinned reference
    /// (`host/repo@sha256:...`) and what moved.
    async fn pull(&self, reference: &str) -> anyhow::Result<(String, String)> {
        let parsed = crate::bundle::registry::reference(reference)?;
        let mut wait = Duration::from_millis(500);
        loop {
            let trust = crate::bundle::serve::trust_of(&self.options.config)?;
            let store = crate::bundle::serve::default_store()?;
            match crate::bundle::serve::fetch(&store, &trust, reference, FLEET_TAG).await {
                Ok((digest, t)) => {
                    let moved = format!("{} blobs, {} bytes pulled, {} already here", t.blobs, t.bytes, t.skipped);
                    return Ok((format!("{}/{}@{digest}", parsed.registry(), parsed.repository()), moved));
                }
                Err(e) if unreachable(&e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "registry unreachable; retrying the pull");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Drops what the fleet assigned before and no longer needs from the bundle store: only the
/// bundles in `keep` (the served one and the one kept for rollback, by digest) stay, with
/// whatever else the store names.
fn collect(keep: &[Option<String>]) -> anyhow::Result<()> {
    let digests: Vec<&str> = keep.iter().flatten().filter_map(|r| r.rsplit_once('@').map(|(_, d)| d)).collect();
    let store = crate::bundle::serve::default_store()?;
    for (name, digest) in store.tags()? {
        if name.starts_with(&format!("{FLEET_TAG}/")) && !digests.contains(&digest.as_str()) {
            store.untag(&name)?;
        }
    }
    let c = store.gc(GC_MIN_AGE)?;
    if c.checkouts + c.blobs > 0 {
        tracing::info!(checkouts = c.checkouts, blobs = c.blobs, bytes = c.bytes, "old bundles removed from the store");
    }
    Ok(())
}

/// Whether a pull failed because the registry could not be reached (worth retrying), not
/// because the bundle was refused.
fn unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| matches!(c.downcast_ref::<BundleError>(), Some(BundleError::Registry(_))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_refuse_pairs_without_a_value() {
        let l = parse_labels("zone=a, hw=x86,").unwrap();
        assert_eq!(l, BTreeMap::from([("zone".into(), "a".into()), ("hw".into(), "x86".into())]));
        assert!(parse_labels("zone").is_err());
    }

    #[test]
    fn refused_bundles_are_not_retried() {
        let refused = anyhow::Error::new(BundleError::Signature("no signature".into())).context("pulling");
        let away = anyhow::Error::new(BundleError::Registry("connection refused".into())).context("pulling");
        assert!(!unreachable(&refused) && unreachable(&away));
    }
}
