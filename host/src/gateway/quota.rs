//! Per-tenant admission: a concurrency cap and a token-bucket rate limit (governor). Either
//! refusal becomes 429 with `Retry-After`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::TenantDecl;

/// A tenant's live admission state (kept across reloads while its quotas are unchanged).
pub struct TenantState {
    /// The tenant's name.
    pub name: String,
    /// Its declaration.
    pub decl: TenantDecl,
    concurrency: Arc<Semaphore>,
    rate: DefaultDirectRateLimiter,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refused {
    /// Over the sustained rate; retry after this long.
    Rate(Duration),
    /// Too many requests in flight.
    Concurrency,
}

impl TenantState {
    /// Fresh state for a tenant.
    pub fn new(name: &str, decl: &TenantDecl) -> Self {
        let period = Duration::from_secs_f64(1.0 / decl.rps.max(1e-6));
        let burst = NonZeroU32::new(decl.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX)).allow_burst(burst);
        Self {
            name: name.to_string(),
            decl: decl.clone(),
            concurrency: Arc::new(Semaphore::new(decl.max_concurrent)),
            rate: RateLimiter::direct(quota),
        }
    }

    /// Whether the quotas match `decl` (then the state can be kept on reload).
    pub fn same_quotas(&self, decl: &TenantDecl) -> bool {
        self.decl.max_concurrent == decl.max_concurrent && self.decl.rps == decl.rps && self.decl.burst == decl.burst
    }

    /// Admits one request, or says why not. The permit is held until the response is sent.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, Refused> {
        if let Err(not_until) = self.rate.check() {
            return Err(Refused::Rate(not_until.wait_time_from(DefaultClock::default().now())));
        }
        self.concurrency.clone().try_acquire_owned().map_err(|_| Refused::Concurrency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Ceilings;

    fn decl(max_concurrent: usize, rps: f64, burst: u32) -> TenantDecl {
        TenantDecl {
            keys_sha256: vec![],
            plugins: vec![],
            models: vec![],
            max_concurrent,
            rps,
            burst,
            max_body: bytesize::ByteSize::mib(1),
            ceilings: Ceilings::default(),
            weight: 1.0,
            compute_quota: None,
        }
    }

    #[test]
    fn concurrency_and_rate_are_capped() {
        let t = TenantState::new("a", &decl(2, 1000.0, 100));
        let p1 = t.admit().unwrap();
        let _p2 = t.admit().unwrap();
        assert_eq!(t.admit().err(), Some(Refused::Concurrency));
        drop(p1);
        assert!(t.admit().is_ok());

        let t = TenantState::new("b", &decl(100, 1.0, 2));
        let _a = t.admit().unwrap();
        let _b = t.admit().unwrap();
        match t.admit() {
            Err(Refused::Rate(wait)) => assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}"),
            other => panic!("expected a rate refusal, got {other:?}"),
        }
    }
}
