//! What the fleet agent needs to know about the gateway's health: a rolling window of the
//! requests it served (count, server errors, p95 latency) for heartbeats, and the smoke
//! requests a version's plugins declare, run against a staged snapshot before it is swapped in.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Snapshot;

/// How far back the serving window looks.
pub const WINDOW: Duration = Duration::from_secs(30);
/// Most requests the window remembers (older ones fall out first), bounding its memory.
const MAX_SAMPLES: usize = 8192;

/// Recent inference requests: when each ended, how long it took, whether the server failed it
/// (a 5xx other than 503: "at capacity, retry" is load, not a fault of the version).
#[derive(Default)]
pub struct Serving {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    samples: VecDeque<(Instant, f32, bool)>,
    total: u64,
    total_errors: u64,
}

/// A summary of the serving window, as heartbeats carry it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServingSummary {
    /// Requests answered since start.
    pub requests: u64,
    /// Of those, answered with a server error (5xx).
    pub errors: u64,
    /// Requests in the window.
    pub window_requests: u64,
    /// Server errors in the window.
    pub window_errors: u64,
    /// The 95th percentile latency in the window, in milliseconds (0 without requests).
    pub p95_ms: f64,
}

impl Serving {
    /// Records one answered inference request.
    pub fn record(&self, took: Duration, server_error: bool) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.samples.len() == MAX_SAMPLES {
            g.samples.pop_front();
        }
        g.samples.push_back((Instant::now(), took.as_secs_f32() * 1000.0, server_error));
        g.total += 1;
        g.total_errors += u64::from(server_error);
    }

    /// Forgets the window (a new version is judged on its own requests); totals stay.
    pub fn reset(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).samples.clear();
    }

    /// The window's summary now.
    pub fn summary(&self) -> ServingSummary {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while g.samples.front().is_some_and(|(at, ..)| now.duration_since(*at) > WINDOW) {
            g.samples.pop_front();
        }
        let mut latencies: Vec<f32> = g.samples.iter().map(|(_, ms, _)| *ms).collect();
        latencies.sort_by(f32::total_cmp);
        let p95 = match latencies.len() {
            0 => 0.0,
            n => f64::from(latencies[((n * 95).div_ceil(100)).clamp(1, n) - 1]),
        };
        ServingSummary {
            requests: g.total,
            errors: g.total_errors,
            window_requests: g.samples.len() as u64,
            window_errors: g.samples.iter().filter(|s| s.2).count() as u64,
            p95_ms: p95,
        }
    }
}

/// Why a staged version failed its health gate.
#[derive(Debug, thiserror::Error)]
#[error("plugin `{plugin}` failed its smoke request: {message}")]
pub struct SmokeFailed {
    /// The plugin.
    pub plugin: String,
    /// What went wrong.
    pub message: String,
}

/// Runs the smoke request of every plugin that declares one,
/// against `snapshot` (not yet serving). The number of smoke requests that passed.
pub async fn smoke(snapshot: &Snapshot) -> Result<usize, SmokeFailed> {
    let mut passed = 0;
    for (name, decl) in &snapshot.config.plugins {
        let Some(body) = &decl.smoke else { continue };
        let fail = |message: String| SmokeFailed { plugin: name.clone(), message };
        let bytes = serde_json::to_vec(body).map_err(|e| fail(e.to_string()))?;
        let request = super::kserve::decode(&bytes, None).map_err(fail)?.request;
        let served = snapshot.models.get(name).and_then(|m| m.versions.get(&m.latest));
        // Any tenant's instance will do: the request is the plugin's own, not a tenant's.
        let Some(plugin) = served.and_then(|s| s.per_tenant.values().next()) else {
            return Err(fail("no tenant may call this plugin, so its smoke request cannot run".into()));
        };
        let started = Instant::now();
        plugin.handle(&request).await.map_err(|e| fail(e.to_string().lines().next().unwrap_or_default().into()))?;
        tracing::info!(plugin = %name, took = ?started.elapsed(), "smoke request passed");
        passed += 1;
    }
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_errors_and_takes_the_95th_percentile() {
        let s = Serving::default();
        assert_eq!(s.summary(), ServingSummary::default());
        for ms in 1..=100u64 {
            s.record(Duration::from_millis(ms), ms % 10 == 0);
        }
        let sum = s.summary();
        assert_eq!((sum.requests, sum.errors, sum.window_requests, sum.window_errors), (100, 10, 100, 10));
        assert!((sum.p95_ms - 95.0).abs() < 0.5, "{}", sum.p95_ms);
        for _ in 0..MAX_SAMPLES {
            s.record(Duration::from_millis(1), false);
        }
        let sum = s.summary();
        assert_eq!((sum.requests, sum.window_requests as usize), (100 + MAX_SAMPLES as u64, MAX_SAMPLES));
    }
}
