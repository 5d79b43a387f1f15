//! The scheduler's metrics, registered into the gateway's `/metrics` (prefix `eir_sched`):
//! per model the queue (depth, wait), batch sizes and padding; per tenant compute seconds,
//! plugin-code seconds, cancellations and refusals.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    tenant: String,
    reason: String,
}

/// Counters and histograms of one scheduler (cheap to clone: the families are shared).
#[derive(Clone)]
pub struct Metrics {
    queue_depth: Family<ModelLabel, Gauge>,
    queue_wait: Family<ModelLabel, Histogram, fn() -> Histogram>,
    batch_rows: Family<ModelLabel, Histogram, fn() -> Histogram>,
    tokens: Family<ModelLabel, Counter>,
    padding: Family<ModelLabel, Counter>,
    compute: Family<TenantLabel, Counter<f64>>,
    plugin: Family<TenantLabel, Counter<f64>>,
    cancelled: Family<Reason, Counter>,
    refused: Family<Reason, Counter>,
}

fn wait_histogram() -> Histogram {
    // 50 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 18))
}

fn rows_histogram() -> Histogram {
    // 1, 2, 4, ... 256 rows
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(wait_histogram as fn() -> Histogram),
            batch_rows: Family::new_with_constructor(rows_histogram as fn() -> Histogram),
            tokens: Family::default(),
            padding: Family::default(),
            compute: Family::default(),
            plugin: Family::default(),
            cancelled: Family::default(),
            refused: Family::default(),
        }
    }
}

fn model(name: &str) -> ModelLabel {
    ModelLabel { model: name.into() }
}

impl Metrics {
    /// Adds these metrics to `registry` under `sched_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sched");
        r.register("queue_depth", "Compute jobs waiting, per model", self.queue_depth.clone());
        r.register("queue_wait_seconds", "Time a compute job waited before its pass began", self.queue_wait.clone());
        r.register("batch_rows", "Rows per forward pass (dynamic batching)", self.batch_rows.clone());
        r.register("tokens", "Tokens (or rows) the callers sent, per model", self.tokens.clone());
        r.register(
            "padding_tokens",
            "Padding tokens computed beyond the callers' own, per model",
            self.padding.clone(),
        );
        r.register("compute_seconds", "Core-seconds of compute charged, per tenant", self.compute.clone());
        r.register(
            "plugin_seconds",
            "CPU-seconds of plugin code (WebAssembly and its inline host calls) charged, per tenant",
            self.plugin.clone(),
        );
        r.register("cancelled", "Compute jobs whose caller went away: queued or running", self.cancelled.clone());
        r.register("refused", "Compute jobs refused: memory (bigger than the budget)", self.refused.clone());
    }

    pub(super) fn depth(&self, name: &str, delta: i64) {
        self.queue_depth.get_or_create(&model(name)).inc_by(delta);
    }

    pub(super) fn waited(&self, name: &str, seconds: f64) {
        self.queue_wait.get_or_create(&model(name)).observe(seconds);
    }

    pub(super) fn batch(&self, name: &str, rows: usize, tokens: u64, padding: u64) {
        let m = model(name);
        self.batch_rows.get_or_create(&m).observe(rows as f64);
        self.tokens.get_or_create(&m).inc_by(tokens);
        self.padding.get_or_create(&m).inc_by(padding);
    }

    pub(super) fn charged(&self, tenant: &str, seconds: f64) {
        self.compute.get_or_create(&TenantLabel { tenant: tenant.into() }).inc_by(seconds.max(0.0));
    }

    pub(super) fn plugin_charged(&self, tenant: &str, seconds: f64) {
        self.plugin.get_or_create(&TenantLabel { tenant: tenant.into() }).inc_by(seconds.max(0.0));
    }

    pub(super) fn cancelled(&self, tenant: &str, stage: &str) {
        self.cancelled.get_or_create(&Reason { tenant: tenant.into(), reason: stage.into() }).inc();
    }

    pub(super) fn refused(&self, tenant: &str, reason: &str) {
        self.refused.get_or_create(&Reason { tenant: tenant.into(), reason: reason.into() }).inc();
    }
}
