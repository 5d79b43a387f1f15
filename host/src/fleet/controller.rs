//! The rollout controller (`eir fleet controller`). Several may run; one leads, through a lock
//! key in the `eir_leader` bucket that expires after the leader TTL unless the leader refreshes
//! it. The leader reads every rollout spec, device record and rollout status at each tick and
//! decides with [`step`], which holds all the policy and touches no I/O; all its state is in
//! JetStream, so a new leader continues where the old one stopped.
//!
//! A rollout brings its group up in steps (percentages of the devices its selector matches):
//! each step assigns the bundle to more devices, waits until each is active and healthy (its
//! heartbeat's server-error rate and p95 latency within the spec's limits), holds, and goes on.
//! Devices whose heartbeats stop are offline after `offline_after` and are skipped, counted
//! failed, or waited for, per the spec. At `max_failures` failed devices the rollout halts and
//! every device it touched is told to roll back to what it served before.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{
    Action, Assignment, Bus, Counts, DeviceRecord, DeviceState, Event, OfflinePolicy, Phase, RolloutSpec, RolloutStatus,
};

/// The leader lock's default lifetime without a refresh.
pub const DEFAULT_LEADER_TTL: Duration = Duration::from_secs(5);
/// The lock's key.
const LOCK: &str = "controller";

/// A device as one tick sees it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Its last record.
    pub record: DeviceRecord,
    /// Whether it reported within the spec's `offline_after`.
    pub online: bool,
}

/// What one tick decided for one rollout.
#[derive(Debug, Default)]
pub struct Decision {
    /// The new status.
    pub status: RolloutStatus,
    /// Assignments to write, by device.
    pub assign: Vec<(String, Assignment)>,
    /// What happened.
    pub events: Vec<(String, String, Option<String>, String)>,
}

/// What `seen` served before this rollout, as it is targeted: what it served when first
/// targeted if it left the rollout and is back (taken out of `departed`), else what it serves
/// now.
fn served_before(status: &mut RolloutStatus, seen: &Seen) -> Option<String> {
    status.departed.remove(&seen.record.id).map_or_else(|| seen.record.bundle.clone(), |(p, _)| p)
}

fn selected(spec: &RolloutSpec, r: &DeviceRecord) -> bool {
    spec.selector.iter().all(|(k, v)| r.labels.get(k) == Some(v))
}

/// One tick of one rollout: from its spec, last status and the devices, the next status, the
/// assignments to write and the events (what, outcome, device, detail).
pub fn step(
    spec: &RolloutSpec,
    last: Option<RolloutStatus>,
    devices: &BTreeMap<String, Seen>,
    now_ms: u64,
) -> Decision {
    let mut status = match last {
        Some(s) if s.generation == spec.generation && s.bundle == spec.bundle => s,
        _ => RolloutStatus {
            generation: spec.generation,
            bundle: spec.bundle.clone(),
            phase: Phase::Progressing,
            since_ms: now_ms,
            message: "started".into(),
            ..Default::default()
        },
    };
    // Devices gone (their records expired, or missing from this tick's listing) or now in
    // another group leave this rollout, remembering what they served before it.
    let (stay, gone): (Vec<_>, Vec<_>) =
        std::mem::take(&mut status.targeted).into_iter().partition(|(id, _)| devices.contains_key(id));
    status.targeted = stay;
    for (id, previous) in gone {
        status.departed.entry(id).or_insert((previous, now_ms));
    }
    let kept = super::DEVICE_RECORD_TTL.as_millis() as u64;
    status.departed.retain(|_, (_, left)| now_ms.saturating_sub(*left) < kept);
    while status.departed.len() > super::MAX_DEPARTED {
        let Some(oldest) = status.departed.iter().min_by_key(|(_, (_, left))| *left).map(|(id, _)| id.clone()) else {
            break;
        };
        status.departed.remove(&oldest);
    }
    status.failed.retain(|id, _| devices.contains_key(id));
    let mut d = Decision::default();
    let apply = Assignment {
        group: spec.group.clone(),
        generation: spec.generation,
        bundle: Some(spec.bundle.clone()),
        action: Action::Apply,
    };
    let group: Vec<&Seen> = devices.values().filter(|s| selected(spec, &s.record)).collect();
    let targeted: BTreeSet<String> = status.targeted.iter().map(|(id, _)| id.clone()).collect();

    // Judge every targeted device.
    let mut counts = Counts {
        matched: group.len(),
        targeted: targeted.len(),
        offline: group.iter().filter(|s| !s.online).count(),
        ..Default::default()
    };
    let mut waiting = Vec::new();
    let timed_out = now_ms.saturating_sub(status.since_ms) > spec.step_timeout.as_millis() as u64;
    for id in &targeted {
        let Some(seen) = devices.get(id) else { continue };
        let r = &seen.record;
        let on_it = r.assignment.as_deref() == Some(apply.id().as_str());
        let active = on_it && r.state == DeviceState::Active;
        let w = &r.serving;
        let judged = w.window_requests >= spec.min_requests.max(1);
        let error_rate = if judged { w.window_errors as f64 / w.window_requests as f64 } else { 0.0 };
        let slow = judged && spec.max_p95_ms.is_some_and(|max| w.p95_ms > max);
        let failure = if on_it && matches!(r.state, DeviceState::Failed | DeviceState::RolledBack) {
            Some(r.error.clone().unwrap_or_else(|| r.state.as_str().into()))
        } else if active && error_rate > spec.max_error_rate {
            Some(format!("error rate {:.1}% over {:.1}%", error_rate * 100.0, spec.max_error_rate * 100.0))
        } else if active && slow {
            Some(format!("p95 {:.0} ms over {:.0} ms", w.p95_ms, spec.max_p95_ms.unwrap_or_default()))
        } else if !seen.online && spec.offline == OfflinePolicy::Fail {
            Some("offline".into())
        } else if !active && seen.online && timed_out && status.phase == Phase::Progressing {
            Some(format!("not active within {}", humantime::format_duration(spec.step_timeout)))
        } else {
            None
        };
        counts.applied += usize::from(active);
        match failure {
            Some(why) => {
                if !status.failed.contains_key(id) {
                    d.events.push(("device_failed".into(), "failed".into(), Some(id.to_string()), why.clone()));
                    status.failed.insert(id.to_string(), super::truncated(why));
                }
            }
            None if active && seen.online => counts.healthy += 1,
            None if !seen.online && spec.offline == OfflinePolicy::Skip => {}
            None => waiting.push(id.to_string()),
        }
    }
    counts.failed = status.failed.len();
    status.counts = counts;
    if status.phase == Phase::RolledBack {
        // A device that left before the rollback and is back is told its previous bundle too.
        let mut back = BTreeSet::new();
        for seen in &group {
            if let Some((previous, _)) = status.departed.remove(&seen.record.id) {
                status.targeted.push((seen.record.id.clone(), previous));
                back.insert(seen.record.id.clone());
                d.events.push((
                    "rollback".into(),
                    "ok".into(),
                    Some(seen.record.id.clone()),
                    "back after leaving".into(),
                ));
            }
        }
        d.assign = desired(spec, &status).into_iter().filter(|(id, _)| back.contains(id)).collect();
        status.counts.targeted = status.targeted.len();
        return d.with(status);
    }
    // Halt and roll back: past the failure threshold while rolling out, or asked to.
    let halt = status.phase != Phase::Complete && status.failed.len() >= spec.max_failures;
    if halt || spec.rollback {
        let why = if spec.rollback {
            "rollback requested".to_string()
        } else {
            format!("{} failed device(s), threshold {}", status.failed.len(), spec.max_failures)
        };
        status.phase = Phase::RolledBack;
        d.assign = desired(spec, &status);
        d.events.push(("rollback".into(), "rolled_back".into(), None, why.clone()));
        status.message = why;
        status.since_ms = now_ms;
        return d.with(status);
    }
    if status.phase == Phase::Complete {
        // Devices that join the group afterwards get the desired state too.
        for seen in group.iter().filter(|s| !targeted.contains(s.record.id.as_str())) {
            let id = seen.record.id.clone();
            let previous = served_before(&mut status, seen);
            status.targeted.push((id.clone(), previous));
            d.assign.push((id.clone(), apply.clone()));
            d.events.push(("assigned".into(), "ok".into(), Some(id), "joined after completion".into()));
        }
        status.counts.targeted = status.targeted.len();
        return d.with(status);
    }
    if spec.paused {
        if status.phase != Phase::Paused {
            d.events.push(("paused".into(), "ok".into(), None, format!("at step {}", status.step + 1)));
        }
        status.phase = Phase::Paused;
        status.message = "paused".into();
        return d.with(status);
    }
    if status.phase == Phase::Paused {
        d.events.push(("resumed".into(), "ok".into(), None, format!("at step {}", status.step + 1)));
        status.phase = Phase::Progressing;
        status.since_ms = now_ms;
    }

    // Bring the current step's devices in.
    let percent = spec.steps.get(status.step).copied().unwrap_or(100) as usize;
    let want = (group.len() * percent).div_ceil(100).max(1).min(group.len());
    let mut new = Vec::new();
    // Online devices first, so a silent one never takes a slot a live one could fill.
    let mut candidates: Vec<&&Seen> = group.iter().filter(|s| !targeted.contains(s.record.id.as_str())).collect();
    candidates.sort_by_key(|s| (!s.online, s.record.id.clone()));
    for seen in candidates.into_iter().take(want.saturating_sub(targeted.len())) {
        let id = seen.record.id.clone();
        let previous = served_before(&mut status, seen);
        status.targeted.push((id.clone(), previous));
        d.assign.push((id.clone(), apply.clone()));
        d.events.push(("assigned".into(), "ok".into(), Some(id.clone()), spec.bundle.clone()));
        new.push(id);
    }
    if !new.is_empty() {
        status.phase = Phase::Progressing;
        status.since_ms = now_ms;
        status.counts.targeted = status.targeted.len();
        status.message = format!("step {}: {percent}% ({want} of {})", status.step + 1, group.len());
        return d.with(status);
    }
    if group.is_empty() {
        status.message = "no device matches the selector yet".into();
        return d.with(status);
    }
    let waiting_for = || {
        let more = waiting.len().saturating_sub(10);
        let mut names = waiting.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        if more > 0 {
            names.push_str(&format!(" and {more} more"));
        }
        names
    };
    match status.phase {
        Phase::Progressing if waiting.is_empty() => {
            status.phase = Phase::Holding;
            status.since_ms = now_ms;
            status.message =
                format!("step {} healthy; holding {}", status.step + 1, humantime::format_duration(spec.hold));
            d.events.push(("step_healthy".into(), "ok".into(), None, status.message.clone()));
        }
        Phase::Progressing => {
            status.message = format!("step {}: waiting for {}", status.step + 1, waiting_for());
        }
        Phase::Holding if !waiting.is_empty() => {
            // Back to waiting; the step's timeout counts from now.
            status.phase = Phase::Progressing;
            status.since_ms = now_ms;
            status.message = format!("step {}: waiting for {}", status.step + 1, waiting_for());
        }
        Phase::Holding if now_ms.saturating_sub(status.since_ms) >= spec.hold.as_millis() as u64 => {
            if status.step + 1 >= spec.steps.len() {
                status.phase = Phase::Complete;
                status.message = format!("complete: {} device(s) on {}", status.targeted.len(), spec.bundle);
                d.events.push(("complete".into(), "ok".into(), None, status.message.clone()));
            } else {
                status.step += 1;
                status.phase = Phase::Progressing;
                status.since_ms = now_ms;
                status.message = format!("step {}", status.step + 1);
                d.events.push((
                    "step".into(),
                    "ok".into(),
                    None,
                    format!("step {} of {}", status.step + 1, spec.steps.len()),
                ));
            }
        }
        _ => {}
    }
    d.with(status)
}

impl Decision {
    fn with(mut self, status: RolloutStatus) -> Self {
        self.status = status;
        self
    }
}

/// What every device a rollout targeted should have: its bundle, or, once rolled back, what
/// the device served before. The controller writes these until each device has taken its up,
/// so a device is never left out because a write was lost (or a leader changed) between the
/// status and the assignments.
pub fn desired(spec: &RolloutSpec, status: &RolloutStatus) -> Vec<(String, Assignment)> {
    status
        .targeted
        .iter()
        .map(|(id, previous)| {
            let (bundle, action) = match status.phase {
                Phase::RolledBack => (previous.clone(), Action::Rollback),
                _ => (Some(spec.bundle.clone()), Action::Apply),
            };
            (id.clone(), Assignment { group: spec.group.clone(), generation: spec.generation, bundle, action })
        })
        .collect()
}

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// The NATS server.
    pub nats: String,
    /// This controller's id (in the lock and in events).
    pub id: String,
    /// How often it looks.
    pub tick: Duration,
    /// The lock's lifetime without a refresh.
    pub leader_ttl: Duration,
}

/// What a leader remembers between ticks.
#[derive(Default)]
struct Memory {
    /// When each device's record last changed, by this controller's clock.
    seen: HashMap<String, (u64, Instant)>,
    /// The assignment (id) this leader last wrote for each device.
    written: HashMap<String, String>,
}

/// Runs a controller until the process ends.
pub async fn run(options: ControllerOptions) -> anyhow::Result<()> {
    if options.tick.checked_mul(2).is_none_or(|t| t >= options.leader_ttl) {
        anyhow::bail!("--tick must be under half of --leader-ttl, so the leader refreshes its lock in time");
    }
    let client = super::connect(&options.nats).await?;
    let who = format!("controller:{}", options.id);
    // The fleet's buckets, the lock's bucket, and the lock's lifetime as the server has it.
    let mut bus: Option<(Bus, async_nats::jetstream::kv::Store, Duration)> = None;
    let mut lock: Option<u64> = None;
    let mut memory = Memory::default();
    loop {
        tokio::time::sleep(options.tick).await;
        if bus.is_none() {
            let opened = async {
                let b = Bus::open(client.clone()).await?;
                let (leader, ttl) = b.leader(options.leader_ttl).await?;
                anyhow::Ok((b, leader, ttl))
            };
            match opened.await {
                Ok(b) => bus = Some(b),
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "fleet not reachable yet");
                    continue;
                }
            }
        }
        let Some((b, leader, ttl)) = &bus else { continue };
        // Lead, or keep leading: the lock is refreshed every tick, and this tick's writes stop
        // once half its lifetime has passed, so they never overlap a successor's.
        let refreshed = Instant::now();
        let held = match lock {
            Some(rev) => leader.update(LOCK, options.id.clone().into(), rev).await.ok(),
            None => leader.create(LOCK, options.id.clone().into()).await.ok(),
        };
        match (lock.is_some(), held.is_some()) {
            (false, true) => {
                tracing::info!(id = %options.id, "leading the fleet");
                memory.written.clear();
                b.event(event(&who, "leader", None, None, "ok", "elected".into())).await;
            }
            (true, false) => tracing::warn!(id = %options.id, "lost the leader lock"),
            _ => {}
        }
        lock = held;
        if lock.is_none() {
            continue;
        }
        // Another controller may have opened the lock's bucket with a shorter lifetime.
        let Some(until) = refreshed.checked_add(options.leader_ttl.min(*ttl) / 2) else { continue };
        let lease = Lease(until);
        if let Err(e) = tick(b, &who, &mut memory, lease).await {
            tracing::warn!(error = %format!("{e:#}"), "controller tick failed; retrying");
            // The server may have come back without the fleet's buckets: open them again.
            if client.connection_state() == async_nats::connection::State::Connected {
                bus = None;
                lock = None;
            }
        }
    }
}

/// Until when this leader may write.
#[derive(Clone, Copy)]
struct Lease(Instant);

impl Lease {
    fn check(self) -> anyhow::Result<()> {
        if Instant::now() < self.0 {
            Ok(())
        } else {
            anyhow::bail!("the leader lock may have lapsed; stopping this tick")
        }
    }
}

fn event(who: &str, what: &str, group: Option<&str>, device: Option<String>, outcome: &str, detail: String) -> Event {
    Event {
        at_ms: super::now_ms(),
        who: who.into(),
        what: what.into(),
        group: group.map(str::to_string),
        device,
        bundle: None,
        outcome: outcome.into(),
        detail,
    }
}

async fn tick(bus: &Bus, who: &str, memory: &mut Memory, lease: Lease) -> anyhow::Result<()> {
    // Devices by their key (never by what a record claims), keys that are not device ids
    // skipped.
    let mut records: Vec<(String, DeviceRecord)> = super::all_json::<DeviceRecord>(&bus.devices, "")
        .await?
        .into_iter()
        .filter(|(key, _)| super::check_name("device id", key).is_ok())
        .collect();
    // A key listing can miss a record rewritten while it runs (a heartbeat): a device seen last
    // tick and missing now is read once more by its key before it counts as gone.
    let mut listed: HashSet<String> = records.iter().map(|(k, _)| k.clone()).collect();
    let missing: Vec<String> = memory.seen.keys().filter(|id| !listed.contains(*id)).cloned().collect();
    for id in missing {
        // As `all_json` does: a record that cannot be read fails the tick, one that does not
        // parse is skipped.
        if let Some(entry) = super::live(&bus.devices, &id).await? {
            match serde_json::from_slice::<DeviceRecord>(&entry.value) {
                Ok(r) => {
                    listed.insert(id.clone());
                    records.push((id, r));
                }
                Err(e) => tracing::warn!(key = %id, error = %e, "skipping a record that does not parse"),
            }
        }
    }
    for (key, r) in &mut records {
        r.id = key.clone();
    }
    let now = Instant::now();
    memory.seen.retain(|id, _| listed.contains(id));
    memory.written.retain(|id, _| listed.contains(id));
    for (id, r) in &records {
        let entry = memory.seen.entry(id.clone()).or_insert((r.seq, now));
        if entry.0 != r.seq {
            *entry = (r.seq, now);
        }
    }
    let mut specs: Vec<RolloutSpec> = Vec::new();
    for (key, spec) in super::all_json::<RolloutSpec>(&bus.rollouts, "spec.").await? {
        match spec.check() {
            Ok(()) if key == format!("spec.{}", spec.group) => specs.push(spec),
            Ok(()) => tracing::warn!(key = %key, "skipping a spec stored under another group's key"),
            Err(e) => tracing::warn!(key = %key, error = %format!("{e:#}"), "skipping an invalid spec"),
        }
    }
    specs.sort_by(|a, b| a.group.cmp(&b.group));
    // A device belongs to the first group (by name) whose selector matches it, so two
    // rollouts never fight over one device's assignment.
    let mut owner: HashMap<&str, &str> = HashMap::new();
    for spec in &specs {
        for (id, r) in &records {
            if selected(spec, r) {
                owner.entry(id.as_str()).or_insert(spec.group.as_str());
            }
        }
    }
    for spec in &specs {
        let devices: BTreeMap<String, Seen> = records
            .iter()
            .filter(|(id, _)| owner.get(id.as_str()) == Some(&spec.group.as_str()))
            .map(|(id, r)| {
                let online = memory.seen.get(id).is_some_and(|(_, at)| now.duration_since(*at) <= spec.offline_after);
                (id.clone(), Seen { record: r.clone(), online })
            })
            .collect();
        if let Err(e) = roll(bus, who, spec, &devices, memory, lease).await {
            tracing::warn!(group = %spec.group, error = %format!("{e:#}"), "rollout tick failed");
            lease.check()?;
        }
    }
    Ok(())
}

/// One tick of one group: decide, write the status, then bring every targeted device's
/// assignment in line with it.
async fn roll(
    bus: &Bus,
    who: &str,
    spec: &RolloutSpec,
    devices: &BTreeMap<String, Seen>,
    memory: &mut Memory,
    lease: Lease,
) -> anyhow::Result<()> {
    let key = format!("status.{}", spec.group);
    let (last, revision) = super::get_json::<RolloutStatus>(&bus.rollouts, &key).await?.unzip();
    let decision = step(spec, last.clone(), devices, super::now_ms());
    if last.as_ref() != Some(&decision.status) {
        lease.check()?;
        // Compare-and-set on what this tick read: a write from a lapsed leader that arrives
        // late fails instead of overwriting a successor's.
        super::put_json_if(&bus.rollouts, &key, &decision.status, revision).await?;
    }
    for (device, a) in desired(spec, &decision.status) {
        let id = a.id();
        let taken = devices.get(&device).is_some_and(|s| s.record.assignment.as_deref() == Some(id.as_str()));
        if taken || memory.written.get(&device) == Some(&id) {
            continue;
        }
        lease.check()?;
        super::put_json(&bus.assign, &device, &a).await?;
        memory.written.insert(device, id);
    }
    if last.as_ref().is_none_or(|l| l.generation != spec.generation || l.bundle != spec.bundle) {
        bus.event(event(who, "rollout_started", Some(&spec.group), None, "ok", spec.bundle.clone())).await;
    }
    for (what, outcome, device, detail) in decision.events {
        let mut e = event(who, &what, Some(&spec.group), device, outcome.as_str(), detail);
        e.bundle = Some(spec.bundle.clone());
        bus.event(e).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RolloutSpec {
        RolloutSpec::parse(
            r#"
group = "edge"
bundle = "127.0.0.1:5000/eir/demo@sha256:0000000000000000000000000000000000000000000000000000000000000000"
steps = [25, 50, 100]
hold = "1s"
offline_after = "5s"
max_failures = 1
"#,
        )
        .unwrap()
    }

    fn fleet(n: usize) -> BTreeMap<String, Seen> {
        (0..n)
            .map(|i| {
                let id = format!("d{i}");
                let record = DeviceRecord { id: id.clone(), bundle: Some("old".into()), ..Default::default() };
                (id, Seen { record, online: true })
            })
            .collect()
    }

    /// A one-step rollout over `n` devices, each of which took its assignment up: the spec,
    /// the devices and the first decision.
    fn rolled_out(n: usize) -> (RolloutSpec, BTreeMap<String, Seen>, Decision) {
        let mut spec = spec();
        spec.steps = vec![100];
        let mut devices = fleet(n);
        let d = step(&spec, None, &devices, 0);
        obey(&mut devices, &d, DeviceState::Active);
        (spec, devices, d)
    }

    /// Devices take their assignments up as the agent would.
    fn obey(devices: &mut BTreeMap<String, Seen>, d: &Decision, state: DeviceState) {
        for (id, a) in &d.assign {
            let r = &mut devices.get_mut(id).unwrap().record;
            r.assignment = Some(a.id());
            r.state = if a.action == Action::Rollback { DeviceState::RolledBack } else { state };
            r.bundle = a.bundle.clone();
        }
    }

    #[test]
    fn a_healthy_rollout_goes_step_by_step_with_holds() {
        let spec = spec();
        let mut devices = fleet(4);
        let d = step(&spec, None, &devices, 0);
        assert_eq!(d.assign.len(), 1, "25% of 4");
        obey(&mut devices, &d, DeviceState::Active);
        let d = step(&spec, Some(d.status), &devices, 10);
        assert_eq!(d.status.phase, Phase::Holding);
        let d = step(&spec, Some(d.status), &devices, 500);
        assert_eq!((d.status.phase, d.status.step), (Phase::Holding, 0), "still holding");
        let d = step(&spec, Some(d.status), &devices, 1100);
        assert_eq!((d.status.phase, d.status.step), (Phase::Progressing, 1));
        let d = step(&spec, Some(d.status), &devices, 1200);
        assert_eq!(d.assign.len(), 1, "50% of 4 is one more");
        obey(&mut devices, &d, DeviceState::Active);
        let mut s = d.status;
        for now in [1300, 2400, 2500, 2600, 3700] {
            let d = step(&spec, Some(s), &devices, now);
            obey(&mut devices, &d, DeviceState::Active);
            s = d.status;
        }
        assert_eq!(s.phase, Phase::Complete, "{}", s.message);
        assert_eq!((s.counts.targeted, s.counts.healthy, s.counts.failed), (4, 4, 0));
    }

    #[test]
    fn a_failing_device_halts_the_rollout_and_everything_it_touched_rolls_back() {
        let spec = spec();
        let mut devices = fleet(4);
        let d = step(&spec, None, &devices, 0);
        obey(&mut devices, &d, DeviceState::Failed);
        let d = step(&spec, Some(d.status), &devices, 10);
        assert_eq!(d.status.phase, Phase::RolledBack);
        assert_eq!(d.assign.len(), 1);
        let (id, back) = &d.assign[0];
        assert_eq!((id.as_str(), back.action, back.bundle.as_deref()), ("d0", Action::Rollback, Some("old")));
        // Nothing else is assigned afterwards.
        let d = step(&spec, Some(d.status), &devices, 5000);
        assert!(d.assign.is_empty());
    }

    #[test]
    fn unhealthy_heartbeats_count_as_failures() {
        let mut spec = spec();
        spec.max_p95_ms = Some(100.0);
        let mut devices = fleet(4);
        let d = step(&spec, None, &devices, 0);
        obey(&mut devices, &d, DeviceState::Active);
        let r = &mut devices.get_mut("d0").unwrap().record;
        r.serving.window_requests = 100;
        r.serving.p95_ms = 250.0;
        let d = step(&spec, Some(d.status), &devices, 10);
        assert_eq!(d.status.phase, Phase::RolledBack, "{}", d.status.message);
        assert!(d.status.failed["d0"].contains("p95"));
    }

    #[test]
    fn offline_devices_are_skipped_failed_or_waited_for_per_policy() {
        for (policy, phase) in [
            (OfflinePolicy::Skip, Phase::Holding),
            (OfflinePolicy::Wait, Phase::Progressing),
            (OfflinePolicy::Fail, Phase::RolledBack),
        ] {
            let mut spec = spec();
            spec.steps = vec![100];
            spec.offline = policy;
            let mut devices = fleet(4);
            devices.get_mut("d3").unwrap().online = false;
            let d = step(&spec, None, &devices, 0);
            assert_eq!(d.assign.len(), 4);
            obey(&mut devices, &d, DeviceState::Active);
            devices.get_mut("d3").unwrap().record.state = DeviceState::Pulling;
            let d = step(&spec, Some(d.status), &devices, 10);
            assert_eq!(d.status.phase, phase, "{policy:?}: {}", d.status.message);
            assert_eq!(d.status.counts.offline, 1);
        }
    }

    #[test]
    fn pause_holds_and_resume_continues() {
        let mut spec = spec();
        let devices = fleet(4);
        let d = step(&spec, None, &devices, 0);
        spec.paused = true;
        let d = step(&spec, Some(d.status), &devices, 10);
        assert_eq!(d.status.phase, Phase::Paused);
        spec.paused = false;
        let d = step(&spec, Some(d.status), &devices, 20);
        assert_eq!(d.status.phase, Phase::Progressing);
    }

    #[test]
    fn devices_that_join_after_completion_get_the_bundle_and_a_new_bundle_restarts() {
        let (mut spec, mut devices, d) = rolled_out(2);
        let d = step(&spec, Some(d.status), &devices, 10);
        let d = step(&spec, Some(d.status), &devices, 2000);
        assert_eq!(d.status.phase, Phase::Complete);
        devices.extend(fleet(3).into_iter().skip(2));
        let d = step(&spec, Some(d.status), &devices, 3000);
        assert_eq!(d.assign.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["d2"]);
        assert_eq!(desired(&spec, &d.status).len(), 3, "every targeted device keeps its assignment");
        // The same generation with another bundle (two applies racing) starts over.
        spec.bundle = spec.bundle.replace("sha256:0000", "sha256:1111");
        let d = step(&spec, Some(d.status), &devices, 4000);
        assert_eq!((d.status.phase, d.status.targeted.len()), (Phase::Progressing, 3));
        assert!(d.status.bundle.contains("sha256:1111"));
    }

    #[test]
    fn after_a_rollback_every_targeted_device_is_told_its_previous_bundle() {
        let spec = spec();
        let mut devices = fleet(4);
        devices.get_mut("d0").unwrap().record.bundle = None;
        let d = step(&spec, None, &devices, 0);
        obey(&mut devices, &d, DeviceState::Failed);
        let d = step(&spec, Some(d.status), &devices, 10);
        let want = desired(&spec, &d.status);
        assert_eq!(want.len(), 1);
        assert_eq!((want[0].1.action, want[0].1.bundle.clone()), (Action::Rollback, None), "d0 had no bundle before");
    }

    #[test]
    fn a_device_that_leaves_the_group_leaves_the_rollout() {
        let spec = spec();
        let mut devices = fleet(4);
        let d = step(&spec, None, &devices, 0);
        assert_eq!(d.status.targeted[0].0, "d0");
        // d0's record expired (or another group owns it now): not counted, not written to.
        devices.remove("d0");
        let d = step(&spec, Some(d.status), &devices, 10);
        assert!(desired(&spec, &d.status).iter().all(|(id, _)| id != "d0"));
        assert_eq!(d.assign.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["d1"], "25% of the 3 left");
    }

    /// A device missing from one tick's listing (a record read while it was rewritten) and
    /// back after the rollout completed is rolled back to what it served before the rollout,
    /// not to the rollout's bundle it serves by then.
    #[test]
    fn a_device_that_comes_back_keeps_what_it_served_before() {
        let before = fleet(2)["d1"].record.bundle.clone();
        let (spec, mut devices, d) = rolled_out(2);
        assert_ne!(devices["d1"].record.bundle, before, "d1 serves the rollout's bundle");
        let d1 = devices.remove("d1").unwrap();
        let d = step(&spec, Some(d.status), &devices, 10);
        assert_eq!(d.status.targeted.len(), 1);
        let d = step(&spec, Some(d.status), &devices, 2000);
        assert_eq!(d.status.phase, Phase::Complete);
        devices.insert("d1".into(), d1);
        let d = step(&spec, Some(d.status), &devices, 3000);
        assert_eq!(d.assign.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["d1"], "joins after completion");
        let mut status = d.status;
        status.phase = Phase::RolledBack;
        let back: Vec<_> = desired(&spec, &status).into_iter().filter(|(id, _)| id == "d1").collect();
        assert_eq!(back.len(), 1, "d1 is targeted again");
        assert_eq!((back[0].1.action, back[0].1.bundle.clone()), (Action::Rollback, before));
        assert!(status.departed.is_empty(), "taken back when it rejoined");
    }

    /// A device that leaves before a rollback and comes back after it is rolled back too; a
    /// departed device is forgotten once its record would have expired.
    #[test]
    fn a_device_back_after_a_rollback_is_rolled_back_and_the_long_gone_are_forgotten() {
        let (mut spec, mut devices, d) = rolled_out(2);
        let d1 = devices.remove("d1").unwrap();
        let d = step(&spec, Some(d.status), &devices, 10);
        spec.rollback = true;
        let d = step(&spec, Some(d.status), &devices, 20);
        assert_eq!(d.status.phase, Phase::RolledBack);
        assert_eq!(d.status.departed.len(), 1);
        devices.insert("d1".into(), d1);
        let d = step(&spec, Some(d.status), &devices, 30);
        let back: Vec<_> = d.assign.iter().map(|(id, a)| (id.as_str(), a.action, a.bundle.clone())).collect();
        assert_eq!(back, [("d1", Action::Rollback, Some("old".to_string()))]);
        assert!(desired(&spec, &d.status).iter().any(|(id, _)| id == "d1"));
        // Gone for longer than a record lives: forgotten.
        devices.remove("d1");
        let d = step(&spec, Some(d.status), &devices, 40);
        assert_eq!(d.status.departed.len(), 1);
        let later = 40 + super::super::DEVICE_RECORD_TTL.as_millis() as u64;
        let d = step(&spec, Some(d.status), &devices, later);
        assert!(d.status.departed.is_empty());
    }

    #[test]
    fn specs_with_bad_steps_or_names_are_refused() {
        let base = "bundle = \"127.0.0.1:5000/eir/demo:1\"\n";
        assert!(RolloutSpec::parse(&format!("group = \"g\"\n{base}")).is_ok());
        for bad in ["group = \"a.b\"", "group = \"g\"\nsteps = [50, 10, 100]", "group = \"g\"\nsteps = [10, 50]"] {
            assert!(RolloutSpec::parse(&format!("{bad}\n{base}")).is_err(), "{bad}");
        }
    }
}
