//! `eir fleet`: the rollout controller, and what operators do with rollouts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::fleet::{self, Bus, DeviceRecord, Event, RolloutSpec, RolloutStatus, controller};

/// Arguments of `eir fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// The NATS server.
    #[arg(long, env = "EIR_NATS_URL", default_value = "nats://127.0.0.1:4222", global = true)]
    nats: String,
    #[command(subcommand)]
    command: FleetCommand,
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    /// Run a rollout controller (one of any number leads, through a lock with a TTL).
    Controller {
        /// This controller's id [default: HOSTNAME-PID].
        #[arg(long)]
        id: Option<String>,
        /// How often it looks at the fleet.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        tick: Duration,
        /// How long the leader lock lasts without a refresh.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        leader_ttl: Duration,
    },
    /// Set a group's desired state from a TOML file (a new rollout); a tag is pinned to its
    /// digest first, so every device gets the same bytes.
    Apply {
        /// The rollout spec.
        file: PathBuf,
    },
    /// Show every group: targeted, applied, healthy, failed, offline; and each device.
    Status {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop assigning more devices in a group's rollout.
    Pause {
        /// The group.
        group: String,
    },
    /// Continue a paused rollout.
    Resume {
        /// The group.
        group: String,
    },
    /// Roll a group's devices back to what they served before its rollout.
    Rollback {
        /// The group.
        group: String,
    },
    /// Print the recorded events (JSON lines, oldest first).
    Events {
        /// How many of the latest.
        #[arg(long, default_value_t = 1000)]
        last: u64,
    },
}

async fn bus(url: &str) -> anyhow::Result<Bus> {
    let client = fleet::connect(url).await?;
    tokio::time::timeout(Duration::from_secs(10), Bus::open(client))
        .await
        .with_context(|| format!("{url} did not answer within 10 s"))?
}

/// Runs `eir fleet`.
pub async fn fleet(args: FleetArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        FleetCommand::Controller { id, tick, leader_ttl } => {
            let id = id.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
                let host: String =
                    host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect();
                format!("{}-{}", if host.is_empty() { "controller" } else { &host }, std::process::id())
            });
            fleet::check_name("controller id", &id)?;
            controller::run(controller::ControllerOptions { nats: args.nats, id, tick, leader_ttl }).await?;
        }
        FleetCommand::Apply { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut spec = RolloutSpec::parse(&text).with_context(|| file.display().to_string())?;
            let reference = crate::bundle::registry::reference(&spec.bundle)?;
            if reference.digest().is_none() {
                let auth = crate::bundle::registry::Auth::from_env();
                let digest = crate::bundle::sign::remote_digest(&reference, &auth).await?;
                spec.bundle = format!("{}/{}@{digest}", reference.registry(), reference.repository());
            }
            let bus = bus(&args.nats).await?;
            let key = format!("spec.{}", spec.group);
            // Compare-and-set: two applies at once never share a generation.
            let last = fleet::get_json::<RolloutSpec>(&bus.rollouts, &key).await?;
            spec.generation = last.as_ref().map(|(s, _)| s.generation + 1).unwrap_or(1);
            fleet::put_json_if(&bus.rollouts, &key, &spec, last.map(|(_, rev)| rev))
                .await
                .with_context(|| format!("group `{}` changed meanwhile; apply again", spec.group))?;
            bus.event(event("apply", &spec.group, format!("generation {} of {}", spec.generation, spec.bundle))).await;
            println!("group {}: generation {} of {}", spec.group, spec.generation, spec.bundle);
        }
        FleetCommand::Pause { group } => flag(&args.nats, &group, "pause", |s| s.paused = true).await?,
        FleetCommand::Resume { group } => flag(&args.nats, &group, "resume", |s| s.paused = false).await?,
        FleetCommand::Rollback { group } => flag(&args.nats, &group, "rollback", |s| s.rollback = true).await?,
        FleetCommand::Status { json } => status(&args.nats, json).await?,
        FleetCommand::Events { last } => {
            for e in bus(&args.nats).await?.events(last).await? {
                println!("{}", serde_json::to_string(&e)?);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn event(what: &str, group: &str, detail: String) -> Event {
    Event {
        at_ms: fleet::now_ms(),
        who: "cli".into(),
        what: what.into(),
        group: Some(group.into()),
        device: None,
        bundle: None,
        outcome: "ok".into(),
        detail,
    }
}

/// Changes a group's spec (compare-and-set on its revision, so two operators cannot lose a
/// change).
async fn flag(url: &str, group: &str, what: &str, change: impl Fn(&mut RolloutSpec)) -> anyhow::Result<()> {
    fleet::check_name("group", group)?;
    let bus = bus(url).await?;
    let key = format!("spec.{group}");
    let (mut spec, revision) = fleet::get_json::<RolloutSpec>(&bus.rollouts, &key)
        .await?
        .with_context(|| format!("no rollout for group `{group}`"))?;
    change(&mut spec);
    fleet::put_json_if(&bus.rollouts, &key, &spec, Some(revision)).await?;
    bus.event(event(what, group, format!("generation {}", spec.generation))).await;
    println!("group {group}: {what}");
    Ok(())
}

async fn status(url: &str, json: bool) -> anyhow::Result<()> {
    let bus = bus(url).await?;
    let specs: Vec<(String, RolloutSpec)> = fleet::all_json(&bus.rollouts, "spec.").await?;
    let devices: Vec<(String, DeviceRecord)> = fleet::all_json(&bus.devices, "").await?;
    let mut groups = Vec::new();
    for (_, spec) in specs {
        let status =
            fleet::get_json::<RolloutStatus>(&bus.rollouts, &format!("status.{}", spec.group)).await?.map(|s| s.0);
        groups.push((spec, status));
    }
    if json {
        let out = serde_json::json!({
            "groups": groups.iter().map(|(spec, status)| serde_json::json!({"spec": spec, "status": status})).collect::<Vec<_>>(),
            "devices": devices.iter().map(|(_, d)| d).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<12} {:>4} {:>8} {:>8} {:>8} {:>7} {:>8}  message",
        "GROUP", "PHASE", "STEP", "TARGETED", "APPLIED", "HEALTHY", "FAILED", "OFFLINE"
    );
    for (spec, status) in &groups {
        let Some(s) = status else {
            println!("{:<16} {:<12} (not picked up by a controller yet)", spec.group, "pending");
            continue;
        };
        let c = &s.counts;
        let phase = serde_json::to_value(s.phase)?.as_str().unwrap_or_default().to_string();
        println!(
            "{:<16} {:<12} {:>4} {:>8} {:>8} {:>8} {:>7} {:>8}  {}",
            spec.group,
            phase,
            s.step + 1,
            c.targeted,
            c.applied,
            c.healthy,
            c.failed,
            c.offline,
            s.message
        );
    }
    println!();
    println!("{:<16} {:<12} {:>8} {:>7} {:>8}  bundle", "DEVICE", "STATE", "REQUESTS", "ERRORS", "P95 MS");
    for (_, d) in &devices {
        println!(
            "{:<16} {:<12} {:>8} {:>7} {:>8.1}  {}",
            d.id,
            d.state.as_str(),
            d.serving.requests,
            d.serving.errors,
            d.serving.p95_ms,
            d.bundle.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
