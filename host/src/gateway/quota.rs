//! Per-tenant admission: a concurrency cap and a token-bucket rate limit (governor). Either
//! refusal becomes 429 with `Retry-After`.
//!
//! A refusal is held before it is answered ([`TenantState::hold_refusal`]): a client that
//! ignores `Retry-After` and asks again at once would otherwise turn refusals into a flood
//! of its own. Answering 27,000 refusals a second on a 2-core machine raised another
//! tenant's median latency 1.6x, nearly all of it in the OS's TCP and wake-ups rather than
//! in the gateway (`scripts/bench-gateway.sh fair 6 10`); held, the same client was refused
//! about 60 times a second, and the other tenant's latency was unchanged.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::TenantDecl;

tokio::task_local! {
    /// How long the request this task serves had refusals held, for the serving window (set
    /// by the gateway's `observe` middleware around each inference request).
    pub static HELD: std::cell::Cell<Duration>;
}

/// A tenant's live admission state (kept across reloads while its quotas are unchanged).
pub struct TenantState {
    /// The tenant's name.
    pub name: String,
    /// Its declaration.
    pub decl: TenantDecl,
    concurrency: Arc<Semaphore>,
    /// Places for refusals being held, as many as requests may be in flight: beyond them a
    /// refusal is answered at once, so what a tenant holds at the gateway stays bounded.
    held: Semaphore,
    rate: DefaultDirectRateLimiter,
    /// Language-model tokens (prompt + generated) per minute, as a bucket holding one
    /// minute's worth; `None` without a `tokens_per_minute` quota.
    tokens: Option<std::sync::Mutex<TokenBucket>>,
}

/// A bucket of tokens refilled at `per_minute`, holding at most a minute's worth. Usage is
/// charged after a generation ends, so the level may go below zero by one request's tokens;
/// new generations wait until it is back above zero.
struct TokenBucket {
    per_minute: f64,
    level: f64,
    at: std::time::Instant,
}

impl TokenBucket {
    fn refill(&mut self) {
        let now = std::time::Instant::now();
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }
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
            held: Semaphore::new(decl.max_concurrent.max(1)),
            rate: RateLimiter::direct(quota),
            tokens: decl.tokens_per_minute.map(|per_minute| {
                let per_minute = per_minute as f64;
                std::sync::Mutex::new(TokenBucket { per_minute, level: per_minute, at: std::time::Instant::now() })
            }),
        }
    }

    /// When over its tokens-per-minute quota: how long until it may start a generation.
    pub fn tokens_wait(&self) -> Option<Duration> {
        let mut b = self.tokens.as_ref()?.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        b.refill();
        // At most a day: a debt beyond that is refused as long as it lasts anyway.
        (b.level < 0.0).then(|| Duration::from_secs_f64((-b.level * 60.0 / b.per_minute.max(1e-9)).min(86_400.0)))
    }

    /// Charges `n` language-model tokens to the quota.
    pub fn charge_tokens(&self, n: usize) {
        if let Some(b) = &self.tokens {
            let mut b = b.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            b.refill();
            // A debt of at most one day's tokens: one request cannot lock a tenant out for
            // longer (usage reported by a plugin is not trusted beyond that either).
            b.level = (b.level - n as f64).max(-b.per_minute * 1440.0);
        }
    }

    /// Whether the quotas match `decl` (then the state can be kept on reload).
    pub fn same_quotas(&self, decl: &TenantDecl) -> bool {
        self.decl.max_concurrent == decl.max_concurrent
            && self.decl.rps == decl.rps
            && self.decl.burst == decl.burst
            && self.decl.tokens_per_minute == decl.tokens_per_minute
    }

    /// Holds one of this tenant's refusals for `min(wait, most)` before it is answered, if
    /// one of its places for held refusals is free (else at once), and returns how much of
    /// `wait` is left for the refusal's `Retry-After`. A client that honours `Retry-After`
    /// waits no longer in all; one that asks again at once is slowed to its own pace.
    pub async fn hold_refusal(&self, wait: Duration, most: Duration) -> Duration {
        let hold = wait.min(most);
        if hold.is_zero() {
            return wait;
        }
        let Ok(_place) = self.held.try_acquire() else { return wait };
        tokio::time::sleep(hold).await;
        // Outside a request's middleware (tests) there is nothing to tell.
        let _ = HELD.try_with(|h| h.set(h.get() + hold));
        wait - hold
    }

    /// Counts one refusal for `reason` in `metrics` and holds it ([`Self::hold_refusal`], at
    /// most `most`): the whole seconds of `wait` left for its `Retry-After`. The caller has
    /// dropped any slot the request held.
    pub async fn refuse(
        &self,
        metrics: &super::metrics::Metrics,
        reason: &'static str,
        wait: Duration,
        most: Duration,
    ) -> u64 {
        metrics.refused(&self.name, reason);
        self.hold_refusal(wait, most).await.as_secs_f64().ceil() as u64
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
    #[test]
    fn the_token_quota_refuses_once_spent_and_refills() {
        let mut d = decl(4, 100.0, 10);
        d.tokens_per_minute = Some(600);
        let t = TenantState::new("t", &d);
        assert!(t.tokens_wait().is_none());
        t.charge_tokens(500);
        assert!(t.tokens_wait().is_none(), "100 tokens left");
        t.charge_tokens(160);
        let wait = t.tokens_wait().expect("60 tokens over");
        // 60 tokens back at 10 per second: about 6 s.
        assert!(wait > Duration::from_secs(5) && wait <= Duration::from_secs(6), "{wait:?}");
        let free = TenantState::new("f", &decl(4, 100.0, 10));
        free.charge_tokens(1_000_000);
        assert!(free.tokens_wait().is_none(), "no quota, no refusal");
    }

    use super::*;
    use crate::config::Ceilings;

    fn decl(max_concurrent: usize, rps: f64, burst: u32) -> TenantDecl {
        TenantDecl {
            keys_sha256: vec![],
            plugins: vec![],
            models: vec![],
            tokens_per_minute: None,
            max_concurrent,
            rps,
            burst,
            max_body: bytesize::ByteSize::mib(1),
            ceilings: Ceilings::default(),
            weight: 1.0,
            compute_quota: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_held_at_most_their_wait_and_as_many_as_may_run() {
        use tokio::time::Instant;
        let t = Arc::new(TenantState::new("a", &decl(2, 1000.0, 100)));
        let (wait, most) = (Duration::from_secs(10), Duration::from_secs(1));
        // Held for the most, and the rest of the wait left for Retry-After.
        let start = Instant::now();
        assert_eq!(t.hold_refusal(wait, most).await, Duration::from_secs(9));
        assert_eq!(start.elapsed(), most);
        // A wait shorter than the most is held whole; a hold of zero answers at once.
        let start = Instant::now();
        assert_eq!(t.hold_refusal(Duration::from_millis(300), most).await, Duration::ZERO);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        let start = Instant::now();
        assert_eq!(t.hold_refusal(wait, Duration::ZERO).await, wait);
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Two places (max_concurrent = 2): while both hold, a third refusal is answered at
        // once with its whole wait; once they are answered, refusals are held again.
        let held: Vec<_> = (0..2)
            .map(|_| {
                let t = t.clone();
                tokio::spawn(async move { t.hold_refusal(wait, most).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let start = Instant::now();
        assert_eq!(t.hold_refusal(wait, most).await, wait);
        assert_eq!(start.elapsed(), Duration::ZERO);
        for h in held {
            assert_eq!(h.await.unwrap(), Duration::from_secs(9));
        }
        let start = Instant::now();
        assert_eq!(t.hold_refusal(wait, most).await, Duration::from_secs(9));
        assert_eq!(start.elapsed(), most);
        // Within a request (the serving window's middleware), the time held is told, so its
        // latency can leave it out; a refusal answered at once adds nothing.
        let held = HELD
            .scope(std::cell::Cell::new(Duration::ZERO), async {
                t.hold_refusal(Duration::from_millis(300), most).await;
                t.hold_refusal(wait, Duration::ZERO).await;
                t.hold_refusal(wait, most).await;
                HELD.with(std::cell::Cell::get)
            })
            .await;
        assert_eq!(held, Duration::from_millis(1300));
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
