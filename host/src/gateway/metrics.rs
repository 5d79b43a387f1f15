//! Prometheus metrics (`GET /metrics`, text format): requests, errors by kind, latency by
//! phase (queue, plugin, compute), in-flight, fuel used, memory high-water, refusals; and the
//! scheduler's (`eir_sched_*`: queues, batch sizes, padding, compute per tenant).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Model {
    tenant: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Code {
    tenant: String,
    model: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    tenant: String,
    model: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Phase {
    tenant: String,
    model: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refusal {
    tenant: String,
    reason: String,
}

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<Code, Counter>,
    errors: Family<Kind, Counter>,
    latency: Family<Phase, Histogram, fn() -> Histogram>,
    in_flight: Family<Model, Gauge>,
    fuel: Family<Model, Counter>,
    memory: Family<Model, Gauge>,
    refused: Family<Refusal, Counter>,
    llm_ttft: Family<Model, Histogram, fn() -> Histogram>,
    llm_rate: Family<Model, Histogram, fn() -> Histogram>,
    llm_tokens: Family<Kind, Counter>,
    llm_sequences: Family<Model, Gauge>,
    llm_kv: Family<Model, Gauge>,
    llm_waiting: Family<Model, Gauge>,
}

fn rate_histogram() -> Histogram {
    // 1 .. ~4000 tokens/s
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("eir");
        let requests = Family::<Code, Counter>::default();
        let errors = Family::<Kind, Counter>::default();
        let latency =
            Family::<Phase, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let in_flight = Family::<Model, Gauge>::default();
        let fuel = Family::<Model, Counter>::default();
        let memory = Family::<Model, Gauge>::default();
        let refused = Family::<Refusal, Counter>::default();
        let llm_ttft =
            Family::<Model, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let llm_rate =
            Family::<Model, Histogram, fn() -> Histogram>::new_with_constructor(rate_histogram as fn() -> Histogram);
        let llm_tokens = Family::<Kind, Counter>::default();
        let llm_sequences = Family::<Model, Gauge>::default();
        let llm_kv = Family::<Model, Gauge>::default();
        let llm_waiting = Family::<Model, Gauge>::default();
        registry.register(
            "llm_active_sequences",
            "Sequences in a language model's running batch, per tenant",
            llm_sequences.clone(),
        );
        registry.register("llm_kv_cache_bytes", "KV cache held by a tenant's sequences", llm_kv.clone());
        registry.register(
            "llm_waiting",
            "Generations waiting for a slot or KV memory (tenant \"*\": all tenants)",
            llm_waiting.clone(),
        );
        registry.register(
            "llm_time_to_first_token_seconds",
            "Generations: time from request to the first generated token",
            llm_ttft.clone(),
        );
        registry.register(
            "llm_decode_tokens_per_second",
            "Generations: tokens per second after the first, per request",
            llm_rate.clone(),
        );
        registry.register(
            "llm_tokens",
            "Language-model tokens by kind (prompt, completion), per tenant and model",
            llm_tokens.clone(),
        );
        registry.register("requests", "Inference requests answered, by HTTP status", requests.clone());
        registry.register("errors", "Failed plugin calls, by error kind", errors.clone());
        registry.register(
            "latency_seconds",
            "Time per request phase: queue, plugin (whole call), compute (wasi-nn)",
            latency.clone(),
        );
        registry.register("in_flight", "Requests being served", in_flight.clone());
        registry.register("fuel_used", "Fuel burnt by plugin calls", fuel.clone());
        registry.register("memory_high_water_bytes", "Largest linear memory a call of the plugin held", memory.clone());
        registry.register("refused", "Requests refused before running: rate, concurrency, queue", refused.clone());
        Self {
            registry,
            requests,
            errors,
            latency,
            in_flight,
            fuel,
            memory,
            refused,
            llm_ttft,
            llm_rate,
            llm_tokens,
            llm_sequences,
            llm_kv,
            llm_waiting,
        }
    }
}

fn model(tenant: &str, model: &str) -> Model {
    Model { tenant: tenant.into(), model: model.into() }
}

impl Metrics {
    /// The same metrics, also exposing the scheduler's (`eir_sched_*`).
    pub fn with_scheduler(mut self, scheduler: &crate::scheduler::Metrics) -> Self {
        scheduler.register(&mut self.registry);
        self
    }

    /// Counts an answered request.
    pub fn request(&self, tenant: &str, m: &str, code: u16) {
        self.requests.get_or_create(&Code { tenant: tenant.into(), model: m.into(), code }).inc();
    }

    /// Counts a failed call.
    pub fn error(&self, tenant: &str, m: &str, kind: &str) {
        self.errors.get_or_create(&Kind { tenant: tenant.into(), model: m.into(), kind: kind.into() }).inc();
    }

    /// Records the time of a phase.
    pub fn latency(&self, tenant: &str, m: &str, phase: &str, seconds: f64) {
        self.latency
            .get_or_create(&Phase { tenant: tenant.into(), model: m.into(), phase: phase.into() })
            .observe(seconds);
    }

    /// Records what a call consumed.
    pub fn usage(&self, tenant: &str, m: &str, fuel: u64, memory: u64) {
        let key = model(tenant, m);
        self.fuel.get_or_create(&key).inc_by(fuel);
        let g = self.memory.get_or_create(&key);
        let memory = i64::try_from(memory).unwrap_or(i64::MAX);
        if memory > g.get() {
            g.set(memory);
        }
    }

    /// Counts a refusal.
    pub fn refused(&self, tenant: &str, reason: &str) {
        self.refused.get_or_create(&Refusal { tenant: tenant.into(), reason: reason.into() }).inc();
    }

    /// Records one finished generation: time to first token (if any token came), decode rate,
    /// and its tokens.
    pub fn generation(
        &self,
        tenant: &str,
        m: &str,
        ttft: Option<f64>,
        rate: Option<f64>,
        prompt: usize,
        completion: usize,
    ) {
        let key = model(tenant, m);
        if let Some(t) = ttft {
            self.llm_ttft.get_or_create(&key).observe(t);
        }
        if let Some(r) = rate {
            self.llm_rate.get_or_create(&key).observe(r);
        }
        let kind = |k: &str| Kind { tenant: tenant.into(), model: m.into(), kind: k.into() };
        self.llm_tokens.get_or_create(&kind("prompt")).inc_by(prompt as u64);
        self.llm_tokens.get_or_create(&kind("completion")).inc_by(completion as u64);
    }

    /// Sets the language models' gauges from their engines' counters (at each scrape).
    pub fn engines(&self, engines: &[(String, crate::llm::engine::Stats)]) {
        // Tenants that left a batch disappear rather than keep their last value.
        self.llm_sequences.clear();
        self.llm_kv.clear();
        for (m, stats) in engines {
            for (tenant, (n, kv)) in &stats.by_tenant {
                self.llm_sequences.get_or_create(&model(tenant, m)).set(*n as i64);
                self.llm_kv.get_or_create(&model(tenant, m)).set(i64::try_from(*kv).unwrap_or(i64::MAX));
            }
            self.llm_waiting.get_or_create(&model("*", m)).set(stats.waiting as i64);
        }
    }

    /// Marks a request as in flight until the guard drops.
    pub fn in_flight(&self, tenant: &str, m: &str) -> InFlight {
        let g = self.in_flight.get_or_create(&model(tenant, m)).clone();
        g.inc();
        InFlight(g)
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Decrements the in-flight gauge when dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
