//! A tenant as the scheduler sees it: its weight in the fair share, the compute it has used,
//! its optional compute quota (core-seconds per minute, a token bucket), and its turns at
//! running plugin code.
//!
//! Turns: a tenant's plugin calls run WebAssembly on at most as many threads at once as the
//! machine has cores. A call holds a turn while its wasm runs, gives it up while it waits for
//! a forward pass, and hands it on at every epoch tick when another of the tenant's calls
//! waits. So however many calls a tenant keeps in flight, it competes for the cores as one
//! party beside the other tenants. The CPU its plugin code uses ([`on_cpu`]) is charged to it
//! like its forward passes.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `fut`, measuring the CPU time its polls take on whichever threads poll it: what a plugin
/// call's own code (WebAssembly and the host calls it makes inline) costs, to be charged to
/// its tenant. Forward passes run on the compute pool, not in these polls, and are charged by
/// the scheduler.
pub fn on_cpu<F: Future>(fut: F) -> OnCpu<F> {
    OnCpu { fut: Box::pin(fut), used: Duration::ZERO }
}

/// See [`on_cpu`]; resolves to the output and the CPU time used.
pub struct OnCpu<F> {
    fut: std::pin::Pin<Box<F>>,
    used: Duration,
}

impl<F: Future> Future for OnCpu<F> {
    type Output = (F::Output, Duration);

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let start = cpu_time::ThreadTime::try_now().ok();
        let polled = self.fut.as_mut().poll(cx);
        if let Some(start) = start {
            self.used += start.try_elapsed().unwrap_or_default();
        }
        polled.map(|out| (out, self.used))
    }
}

/// A turn at running plugin code (see the module docs).
pub type Turn = OwnedSemaphorePermit;

/// Where a call keeps its turn, reachable from its store's epoch callback.
pub type TurnSlot = Arc<Mutex<Option<Turn>>>;

/// Awaits `f` without holding the call's turn at running plugin code, so the tenant's other
/// calls run theirs meanwhile (a plugin waiting on a generation or a forward pass runs no
/// code), then waits for a turn again before the plugin continues.
pub async fn without_turn<T>(tenant: &Tenant, slot: &TurnSlot, f: impl std::future::Future<Output = T>) -> T {
    drop(slot.lock().ok().and_then(|mut t| t.take()));
    let out = f.await;
    let turn = tenant.turn().await;
    if let Ok(mut s) = slot.lock() {
        *s = turn;
    }
    out
}

/// The tenant that plain `eir run` and tests compute as.
pub const LOCAL: &str = "local";

/// One tenant's account. Shared (`Arc`) by its plugins and the scheduler; kept across
/// configuration reloads so that usage and quota carry over.
#[derive(Debug)]
pub struct Tenant {
    name: std::sync::Arc<str>,
    /// The weight, as f64 bits.
    weight: AtomicU64,
    /// Compute charged so far, in core-nanoseconds.
    used: AtomicU64,
    quota: Mutex<Bucket>,
    turns: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// Core-seconds a tenant may use per minute, as a token bucket holding one minute's worth.
#[derive(Debug)]
struct Bucket {
    per_minute: Option<f64>,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        if let Some(cap) = self.per_minute {
            let dt = now.saturating_duration_since(self.at).as_secs_f64();
            self.level = (self.level + dt * cap / 60.0).min(cap);
        }
        self.at = now;
    }
}

impl Tenant {
    /// A tenant of weight 1 without a quota.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            weight: AtomicU64::new(1f64.to_bits()),
            used: AtomicU64::new(0),
            quota: Mutex::new(Bucket { per_minute: None, level: 0.0, at: Instant::now() }),
            turns: Arc::new(Semaphore::new(super::cores())),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Waits for a turn at running plugin code (`None` only if turns were shut down, which
    /// never happens: the call then runs without one).
    pub async fn turn(&self) -> Option<Turn> {
        struct Waiter<'a>(&'a AtomicUsize);
        impl Drop for Waiter<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiter = Waiter(&self.waiting);
        self.turns.clone().acquire_owned().await.ok()
    }

    /// Whether another of its calls waits for a turn (a running call then hands its turn on).
    pub fn contended(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn name_arc(&self) -> std::sync::Arc<str> {
        self.name.clone()
    }

    /// Its share of compute relative to other tenants (default 1).
    pub fn weight(&self) -> f64 {
        f64::from_bits(self.weight.load(Ordering::Relaxed))
    }

    /// Sets the weight (clamped to a small positive minimum) and the quota in core-seconds per
    /// minute (`None`: unlimited). A changed quota starts with a full bucket.
    pub fn configure(&self, weight: f64, per_minute: Option<f64>) {
        let weight = if weight.is_finite() { weight.max(1e-3) } else { 1.0 };
        self.weight.store(weight.to_bits(), Ordering::Relaxed);
        if let Ok(mut q) = self.quota.lock()
            && q.per_minute != per_minute
        {
            *q = Bucket { per_minute, level: per_minute.unwrap_or(0.0), at: Instant::now() };
        }
    }

    /// Compute charged to it so far, in core-seconds.
    pub fn used_seconds(&self) -> f64 {
        self.used.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Charges `seconds` of compute (finished or abandoned work alike).
    pub(crate) fn charge(&self, seconds: f64) {
        self.used.fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
        if let Ok(mut q) = self.quota.lock() {
            q.refill(Instant::now());
            if q.per_minute.is_some() {
                q.level -= seconds;
            }
        }
    }

    /// When over its quota: how long until it may compute again.
    pub fn over_quota(&self) -> Option<Duration> {
        let mut q = self.quota.lock().ok()?;
        q.refill(Instant::now());
        let cap = q.per_minute?;
        (q.level < 0.0).then(|| Duration::from_secs_f64(-q.level * 60.0 / cap.max(1e-9)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_bounded_and_waiters_are_seen() {
        let t = Arc::new(Tenant::new("a"));
        let cores = super::super::cores();
        let mut held = Vec::new();
        for _ in 0..cores {
            held.push(t.turn().await.expect("a turn"));
        }
        assert!(!t.contended());
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.turn().await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(t.contended(), "a call waits");
        held.pop();
        assert!(waiter.await.unwrap(), "a given-up turn goes to the waiter");
        assert!(!t.contended());
    }

    #[test]
    fn the_quota_is_a_bucket_of_core_seconds_per_minute() {
        let t = Tenant::new("a");
        assert_eq!(t.weight(), 1.0);
        t.charge(100.0);
        assert!(t.over_quota().is_none(), "no quota, no refusal");
        t.configure(2.0, Some(6.0));
        assert_eq!(t.weight(), 2.0);
        t.charge(5.0);
        assert!(t.over_quota().is_none(), "within the minute's 6 core-seconds");
        t.charge(2.0);
        let wait = t.over_quota().expect("1 core-second over");
        // 1 core-second back at 6 per minute: about 10 s.
        assert!(wait > Duration::from_secs(9) && wait <= Duration::from_secs(10), "{wait:?}");
        assert!((t.used_seconds() - 107.0).abs() < 1e-6);
        t.configure(f64::NAN, None);
        assert_eq!(t.weight(), 1.0);
        assert!(t.over_quota().is_none());
    }
}
