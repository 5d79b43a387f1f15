//! Fleets: many `eir serve` devices, one desired state, rolled out in stages over NATS
//! JetStream.
//!
//! Everything lives in JetStream, so any controller can pick up where another stopped and a
//! device that was away catches up by reading, not by being told twice:
//! - KV `eir_devices`: each device's record ([`DeviceRecord`]), rewritten at every heartbeat and
//!   state change by its [`agent`].
//! - KV `eir_assign`: what each device should serve ([`Assignment`]), written by the controller.
//! - KV `eir_rollouts`: `spec.GROUP` ([`RolloutSpec`], written by `eir fleet apply | pause |
//!   resume | rollback`) and `status.GROUP` ([`RolloutStatus`], written by the controller).
//! - KV `eir_leader`: the controller lock, a key whose bucket expires it after the leader TTL
//!   unless the leader refreshes it ([`controller`]).
//! - Stream `EIR_EVENTS` (`eir.events.>`): every step a rollout takes, who took it, and how it
//!   ended ([`Event`]).
//!
//! The agent drives the gateway's one reload path ([`crate::gateway::Gateway::apply`]); the
//! fleet adds no second way to change what is served.

pub mod agent;
pub mod controller;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::gateway::health::ServingSummary;

/// The devices bucket.
pub const DEVICES: &str = "eir_devices";
/// The assignments bucket.
pub const ASSIGN: &str = "eir_assign";
/// The rollouts bucket.
pub const ROLLOUTS: &str = "eir_rollouts";
/// The controller-lock bucket.
pub const LEADER: &str = "eir_leader";
/// The events stream.
pub const EVENTS: &str = "EIR_EVENTS";
/// Most events the stream keeps, and most bytes (the oldest go first).
const MAX_EVENTS: i64 = 100_000;
const MAX_EVENT_BYTES: i64 = 64 << 20;
/// Largest record the fleet buckets and stream accept (a rollout's status names every device it
/// targeted: about 10,000 devices).
const MAX_VALUE: i32 = 1 << 20;
/// Most departed devices a rollout's status remembers ([`RolloutStatus::departed`]): with
/// devices that come and go under new ids, the status would otherwise grow past
/// [`MAX_VALUE`]; the longest gone are forgotten first.
pub const MAX_DEPARTED: usize = 4096;

/// How long a device record outlives the device's last heartbeat (a device gone for good, e.g.
/// a replaced pod, then leaves every group).
pub const DEVICE_RECORD_TTL: Duration = Duration::from_secs(3600);
/// Longest error or detail text a record or event carries.
pub const MAX_TEXT: usize = 1024;

/// `text` cut to [`MAX_TEXT`] bytes (at a character boundary).
pub fn truncated(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Where a device is with its assignment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Serving what its own configuration says; nothing assigned yet.
    #[default]
    Idle,
    /// Fetching the assigned bundle (signature checked before any blob moves).
    Pulling,
    /// Checking the bundle out (every file against its digest) and validating its fragment.
    Verifying,
    /// Built beside the running version (models loaded, plugins compiled), health gate running.
    Staged,
    /// Serving the assigned bundle.
    Active,
    /// The assigned bundle failed (pull, trust, load or health gate); the last good version
    /// keeps serving.
    Failed,
    /// Back on the version it had before, as the controller asked.
    RolledBack,
}

impl DeviceState {
    /// Its name, as records and `eir fleet status` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Pulling => "pulling",
            Self::Verifying => "verifying",
            Self::Staged => "staged",
            Self::Active => "active",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }
}

/// A device's record in `eir_devices`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Its id.
    pub id: String,
    /// Its labels (`zone=a`, `hw=x86`), which rollouts select on.
    pub labels: BTreeMap<String, String>,
    /// Where it serves.
    pub address: String,
    /// The EIR version it runs.
    pub eir_version: String,
    /// Where it is with its assignment.
    pub state: DeviceState,
    /// The assignment it last took up (its [`Assignment::id`]).
    pub assignment: Option<String>,
    /// The bundle it serves (`None`: only its own configuration).
    pub bundle: Option<String>,
    /// The bundle it served before, kept for instant rollback.
    pub previous: Option<String>,
    /// Why the last assignment failed.
    pub error: Option<String>,
    /// What it served recently.
    pub serving: ServingSummary,
    /// Incremented at every write: the controller counts a device silent when this stops
    /// changing (its own clock, never the device's).
    pub seq: u64,
}

/// What to do with an assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Take the bundle up.
    Apply,
    /// Go back to the bundle held before (instant when the device still holds it).
    Rollback,
}

/// What one device should serve, in `eir_assign`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The rollout group that assigned it.
    pub group: String,
    /// The rollout's generation.
    pub generation: u64,
    /// The bundle, pinned by digest (`None`: no bundle, only the device's own configuration).
    pub bundle: Option<String>,
    /// Apply or roll back.
    pub action: Action,
}

impl Assignment {
    /// Identifies the assignment in device records.
    pub fn id(&self) -> String {
        let action = match self.action {
            Action::Apply => "apply",
            Action::Rollback => "rollback",
        };
        format!("{}/{}/{action}", self.group, self.generation)
    }
}

/// What to do with a device that stops reporting during a rollout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflinePolicy {
    /// Proceed without it; it takes its assignment up when it is back.
    #[default]
    Skip,
    /// Count it as failed.
    Fail,
    /// Hold the step until it is back.
    Wait,
}

/// A desired state for a group of devices (`eir fleet apply FILE`, TOML).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The group's name (letters, digits, `-`, `_`).
    pub group: String,
    /// The bundle (`host/repo:tag` is pinned to its digest by `eir fleet apply`).
    pub bundle: String,
    /// Labels a device must all have to be in the group (empty: every device).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Percentages of the group each step brings up to, rising, ending at 100.
    #[serde(default = "default_steps")]
    pub steps: Vec<u32>,
    /// How long each step must stay healthy before the next begins.
    #[serde(default = "default_hold", with = "humantime_serde")]
    pub hold: Duration,
    /// Silence after which a device counts as offline.
    #[serde(default = "default_offline_after", with = "humantime_serde")]
    pub offline_after: Duration,
    /// What offline devices mean for the rollout.
    #[serde(default)]
    pub offline: OfflinePolicy,
    /// Failed devices at which the rollout halts and rolls back.
    #[serde(default = "default_max_failures")]
    pub max_failures: usize,
    /// Longest a device may take to become active before it counts as failed.
    #[serde(default = "default_step_timeout", with = "humantime_serde")]
    pub step_timeout: Duration,
    /// Server-error rate in a device's heartbeat window above which it counts as unhealthy.
    #[serde(default = "default_error_rate")]
    pub max_error_rate: f64,
    /// p95 latency (ms) in a device's heartbeat window above which it counts as unhealthy.
    #[serde(default)]
    pub max_p95_ms: Option<f64>,
    /// Requests a window needs before its error rate and latency are judged.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Set by `eir fleet apply`: bumped at every apply.
    #[serde(default)]
    pub generation: u64,
    /// Set by `eir fleet pause | resume`.
    #[serde(default)]
    pub paused: bool,
    /// Set by `eir fleet rollback`.
    #[serde(default)]
    pub rollback: bool,
}

fn default_steps() -> Vec<u32> {
    vec![10, 50, 100]
}
fn default_hold() -> Duration {
    Duration::from_secs(30)
}
fn default_offline_after() -> Duration {
    Duration::from_secs(30)
}
fn default_max_failures() -> usize {
    1
}
fn default_step_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_error_rate() -> f64 {
    0.05
}
fn default_min_requests() -> u64 {
    20
}

impl RolloutSpec {
    /// Parses and checks a spec file's text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let spec: Self = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        spec.check()?;
        Ok(spec)
    }

    /// Checks names, steps and thresholds.
    pub fn check(&self) -> anyhow::Result<()> {
        check_name("group", &self.group)?;
        crate::bundle::registry::reference(&self.bundle)?;
        let rising = self.steps.windows(2).all(|w| w[0] < w[1]);
        if self.steps.is_empty() || !rising || self.steps.first() == Some(&0) || self.steps.last() != Some(&100) {
            anyhow::bail!("steps must rise from above 0 to 100 (e.g. [10, 50, 100]), not {:?}", self.steps);
        }
        if self.max_failures == 0 {
            anyhow::bail!("max_failures must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            anyhow::bail!("max_error_rate must be within 0..=1");
        }
        Ok(())
    }
}

/// Where a rollout is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Assigning the current step and waiting for its devices.
    #[default]
    Progressing,
    /// The step is healthy; holding before the next.
    Holding,
    /// Paused by `eir fleet pause`.
    Paused,
    /// Every step done.
    Complete,
    /// Halted past the failure threshold (or by `eir fleet rollback`); devices rolled back.
    RolledBack,
}

impl Phase {
    /// Whether the rollout has ended.
    pub fn ended(self) -> bool {
        matches!(self, Self::Complete | Self::RolledBack)
    }
}

/// Per-group counts, as `eir fleet status` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Devices the selector matches.
    pub matched: usize,
    /// Devices assigned the bundle so far.
    pub targeted: usize,
    /// Of those, serving it.
    pub applied: usize,
    /// Of those, serving it and healthy.
    pub healthy: usize,
    /// Of those, failed.
    pub failed: usize,
    /// Devices in the group that are silent.
    pub offline: usize,
}

/// A rollout's progress, in `status.GROUP`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The spec generation it is rolling out.
    pub generation: u64,
    /// The bundle.
    pub bundle: String,
    /// Where it is.
    pub phase: Phase,
    /// The current step (an index into the spec's steps).
    pub step: usize,
    /// Unix milliseconds (controller clock) when the current step or hold began.
    pub since_ms: u64,
    /// Devices assigned so far, in order, with what each served before.
    pub targeted: Vec<(String, Option<String>)>,
    /// Devices that were targeted and then left the rollout (their record unseen, or in
    /// another group): what each served before it was first targeted, and when it left (Unix
    /// milliseconds). One that comes back is rolled back to that, not to the rollout's own
    /// bundle it may serve by then. Kept for [`DEVICE_RECORD_TTL`] (a device away longer
    /// comes back as a new one) and at most [`MAX_DEPARTED`] of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub departed: BTreeMap<String, (Option<String>, u64)>,
    /// Devices counted failed, with why.
    pub failed: BTreeMap<String, String>,
    /// The counts at the last tick.
    pub counts: Counts,
    /// Why it is where it is.
    pub message: String,
}

/// One thing that happened, in the `EIR_EVENTS` stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// Who did it (`controller:ID` or `device:ID`, or `cli`).
    pub who: String,
    /// What (`apply`, `assigned`, `step`, `active`, `failed`, `rollback`, ...).
    pub what: String,
    /// The rollout group.
    pub group: Option<String>,
    /// The device.
    pub device: Option<String>,
    /// The bundle.
    pub bundle: Option<String>,
    /// How it ended (`ok`, `failed`, `refused`, ...).
    pub outcome: String,
    /// Details.
    pub detail: String,
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Checks a device id or group name: 1–64 of letters, digits, `-` and `_` (safe as a KV key
/// and a subject token).
pub fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    let ok =
        !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok { Ok(()) } else { anyhow::bail!("{what} `{name}`: use 1-64 letters, digits, `-` or `_`") }
}

/// The fleet's buckets and stream on one NATS connection.
#[derive(Clone)]
pub struct Bus {
    /// JetStream.
    pub js: jetstream::Context,
    /// Device records.
    pub devices: kv::Store,
    /// Assignments.
    pub assign: kv::Store,
    /// Rollout specs and statuses.
    pub rollouts: kv::Store,
}

/// Connects to `url`, retrying in the background until the server is there, and reconnecting
/// whenever it goes away (at most every 2 s).
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|n| Duration::from_millis(100 * (n as u64).min(20)))
        .event_callback(|e| async move { tracing::info!(event = %e, "nats") })
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))
}

fn bucket(name: &str, max_age: Duration) -> kv::Config {
    kv::Config { bucket: name.into(), history: 1, max_age, max_value_size: MAX_VALUE, ..Default::default() }
}

/// Opens bucket `config.bucket`, creating it, or updating its settings where they differ.
async fn open_bucket(js: &jetstream::Context, config: kv::Config) -> anyhow::Result<kv::Store> {
    let name = config.bucket.clone();
    if let Ok(mut existing) = js.get_stream(format!("KV_{name}")).await
        && let Ok(info) = existing.info().await
        && info.config.max_age == config.max_age
        && info.config.max_message_size == config.max_value_size
    {
        return js.get_key_value(&name).await.with_context(|| format!("opening bucket {name}"));
    }
    js.create_or_update_key_value(config).await.with_context(|| format!("creating bucket {name}"))
}

impl Bus {
    /// Opens (creating where missing) the fleet's buckets and stream. Fails while the server
    /// is unreachable.
    pub async fn open(client: async_nats::Client) -> anyhow::Result<Self> {
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(3));
        let devices = open_bucket(&js, bucket(DEVICES, DEVICE_RECORD_TTL)).await?;
        let assign = open_bucket(&js, bucket(ASSIGN, Duration::ZERO)).await?;
        let rollouts = open_bucket(&js, bucket(ROLLOUTS, Duration::ZERO)).await?;
        js.get_or_create_stream(jetstream::stream::Config {
            name: EVENTS.into(),
            subjects: vec!["eir.events.>".into()],
            max_messages: MAX_EVENTS,
            max_bytes: MAX_EVENT_BYTES,
            max_message_size: MAX_VALUE,
            ..Default::default()
        })
        .await
        .context("creating the events stream")?;
        Ok(Self { js, devices, assign, rollouts })
    }

    /// The controller lock's bucket, whose records expire after `ttl` without a refresh, and
    /// the lifetime the server holds for it.
    pub async fn leader(&self, ttl: Duration) -> anyhow::Result<(kv::Store, Duration)> {
        let store = open_bucket(&self.js, bucket(LEADER, ttl)).await?;
        let mut stream = self.js.get_stream(format!("KV_{LEADER}")).await.context("reading the lock's bucket")?;
        let actual = stream.info().await.context("reading the lock's bucket")?.config.max_age;
        Ok((store, actual))
    }

    /// Records an event (logged, and lost with a warning when the server is away).
    pub async fn event(&self, event: Event) {
        tracing::info!(who = %event.who, what = %event.what, group = ?event.group, device = ?event.device,
            outcome = %event.outcome, detail = %event.detail, "fleet event");
        let subject = match (&event.group, &event.device) {
            (_, Some(d)) => format!("eir.events.device.{d}"),
            (Some(g), None) => format!("eir.events.rollout.{g}"),
            (None, None) => "eir.events.fleet".into(),
        };
        let event = Event { detail: truncated(event.detail), ..event };
        let Ok(payload) = serde_json::to_vec(&event) else { return };
        let sent = async { self.js.publish(subject, payload.into()).await?.await.map(|_| ()).map_err(Into::into) };
        if let Err(e) = sent.await as Result<(), async_nats::Error> {
            tracing::warn!(error = %e, "could not record a fleet event");
        }
    }

    /// The last `n` events in the stream, oldest first.
    pub async fn events(&self, n: u64) -> anyhow::Result<Vec<Event>> {
        let mut stream = self.js.get_stream(EVENTS).await.context("opening the events stream")?;
        let state = stream.info().await.context("reading the events stream")?.state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        let first = state.first_sequence.max(state.last_sequence.saturating_sub(n.saturating_sub(1)));
        for seq in first..=state.last_sequence {
            if let Ok(m) = stream.get_raw_message(seq).await
                && let Ok(e) = serde_json::from_slice(&m.payload)
            {
                out.push(e);
            }
        }
        Ok(out)
    }
}

/// Reads and parses `key` of `store`, with its revision.
pub async fn get_json<T: DeserializeOwned>(store: &kv::Store, key: &str) -> anyhow::Result<Option<(T, u64)>> {
    let Some(entry) = live(store, key).await? else { return Ok(None) };
    let value = serde_json::from_slice(&entry.value).with_context(|| format!("parsing {key}"))?;
    Ok(Some((value, entry.revision)))
}

/// `key`'s entry, unless it is missing or deleted.
async fn live(store: &kv::Store, key: &str) -> anyhow::Result<Option<kv::Entry>> {
    let entry = store.entry(key).await.with_context(|| format!("reading {key}"))?;
    Ok(entry.filter(|e| e.operation == kv::Operation::Put))
}

/// Writes `value` as `key` of `store`.
pub async fn put_json<T: Serialize>(store: &kv::Store, key: &str, value: &T) -> anyhow::Result<u64> {
    let bytes = serde_json::to_vec(value)?;
    store.put(key, bytes.into()).await.with_context(|| format!("writing {key}"))
}

/// Writes `value` as `key` only if `key` is still at `revision` (`None`: only if it does not
/// exist), so a write based on a stale read fails instead of overwriting a newer one.
pub async fn put_json_if<T: Serialize>(
    store: &kv::Store,
    key: &str,
    value: &T,
    revision: Option<u64>,
) -> anyhow::Result<u64> {
    let bytes: axum::body::Bytes = serde_json::to_vec(value)?.into();
    let written = match revision {
        Some(rev) => store.update(key, bytes, rev).await.map_err(anyhow::Error::from),
        None => store.create(key, bytes).await.map_err(anyhow::Error::from),
    };
    written.with_context(|| format!("writing {key} (changed meanwhile?)"))
}

/// Every record of `store` whose key starts with `prefix`, parsed; a record that does not
/// parse is skipped with a warning, so one bad record cannot stop a fleet (a record that cannot
/// be read fails the whole read: a partial view would look like devices gone).
pub async fn all_json<T: DeserializeOwned>(store: &kv::Store, prefix: &str) -> anyhow::Result<Vec<(String, T)>> {
    use futures_util::TryStreamExt as _;
    let keys: Vec<String> = store.keys().await.context("listing keys")?.try_collect().await.context("listing keys")?;
    let mut out = Vec::new();
    for key in keys.into_iter().filter(|k| k.starts_with(prefix)) {
        let Some(entry) = live(store, &key).await? else { continue };
        match serde_json::from_slice(&entry.value) {
            Ok(v) => out.push((key, v)),
            Err(e) => tracing::warn!(key = %key, error = %e, "skipping a record that does not parse"),
        }
    }
    Ok(out)
}
