//! What one forward pass (or one model load) may use, and when it must stop.
//!
//! A [`Meter`] travels with every compute into the backend. Before an operator allocates, the
//! backend asks it for the bytes the operator will need ([`Meter::reserve`]), computed from the
//! real input shapes with checked arithmetic ([`bytes_of`]); a request over the budget is a
//! `too-large` error before anything is allocated, never an aborted host. Between operators or
//! layers the backend calls [`Meter::checkpoint`], which ends the work once the caller's
//! deadline has passed or its [`CancelToken`] was cancelled (the caller timed out or went
//! away), so abandoned work frees its compute slot within one operator. A checkpoint is also
//! where a pass steps aside ([`Meter::yielding_to`]) while a fairer tenant's pass runs; a
//! [`ShareClock`] measures the cores' time each pass actually had, stepping aside excluded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::error::NnError;

/// A flag the waiting side sets when it no longer wants a job's result; work checks it at
/// its checkpoints, and async waiters can await it. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<TokenInner>);

#[derive(Debug, Default)]
struct TokenInner {
    cancelled: AtomicBool,
    notify: tokio::sync::Notify,
}

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the work behind this token to stop at its next checkpoint.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::Acquire)
    }

    /// Completes once the token is cancelled (at once if it already is).
    pub async fn cancelled(&self) {
        loop {
            // Registered before the check, so a cancel between the two still wakes it.
            let notified = self.0.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// A guard that cancels this token when dropped, unless [`CancelOnDrop::disarm`]ed first:
    /// held by a waiting future, it turns "the caller stopped waiting" into a cancellation.
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(Some(self.clone()))
    }
}

/// See [`CancelToken::cancel_on_drop`].
#[derive(Debug)]
pub struct CancelOnDrop(Option<CancelToken>);

impl CancelOnDrop {
    /// The wait ended normally: dropping the guard no longer cancels.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            token.cancel();
        }
    }
}

/// One caller's share of a batched pass: its rows of the batch, and when it stops wanting
/// them (its token is cancelled or its deadline passes).
#[derive(Clone, Debug)]
pub struct Part {
    /// Its rows of the batch.
    pub rows: std::ops::Range<usize>,
    /// Cancelled when the caller goes away.
    pub token: CancelToken,
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
}

impl Part {
    fn wanted(&self, now: Instant) -> bool {
        !self.token.is_cancelled() && self.deadline.is_none_or(|d| now < d)
    }
}

/// The memory budget, deadline and cancellation of one compute (or load).
#[derive(Debug)]
pub struct Meter {
    budget: u64,
    live: AtomicU64,
    peak: AtomicU64,
    token: CancelToken,
    deadline: Option<Instant>,
    /// For a batched pass, each caller's rows: the pass goes on while any caller wants its
    /// rows, and a backend may drop the rows nobody wants any more ([`Meter::row_wanted`]).
    parts: Vec<Part>,
    /// "compute" or "load": named in errors.
    what: &'static str,
    /// The number of the priority pass running (0: none), the last one launched before this
    /// work began, and the pass's account: checkpoints wait while a later one runs (see
    /// [`Meter::yielding_to`]), standing aside on the account meanwhile.
    yield_to: Option<(Arc<AtomicU64>, u64, Arc<Occupancy>)>,
}

impl Meter {
    /// A compute that may hold `budget` bytes of intermediate values at once and must stop at
    /// `deadline` or when `token` is cancelled.
    pub fn new(budget: u64, token: CancelToken, deadline: Option<Instant>) -> Self {
        Self {
            budget,
            live: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            token,
            deadline,
            parts: Vec::new(),
            what: "compute",
            yield_to: None,
        }
    }

    /// This meter, whose checkpoints wait while `running` names a priority pass numbered
    /// above `seen`: the scheduler numbers a pass it lets in for a tenant behind its share
    /// past the usual number of passes, so that running passes step aside at their next layer
    /// or operator. A waiting checkpoint runs other pool work meanwhile (the priority pass's,
    /// most likely) and still ends the work when it is cancelled or late. Only work that
    /// began before the priority pass was launched waits for it: work that began later may
    /// be running on top of it on the same thread (a waiting checkpoint runs pool work, and
    /// so does a pass waiting for its own parallel parts), and waiting there would wait for
    /// itself. While it waits, the pass stands aside on `account` (it accrues no share of the
    /// cores).
    pub fn yielding_to(mut self, running: Arc<AtomicU64>, seen: u64, account: Arc<Occupancy>) -> Self {
        self.yield_to = Some((running, seen, account));
        self
    }

    /// A batched pass under `budget`, serving `parts` (each caller's rows, token and
    /// deadline): it stops once no caller wants its rows.
    pub fn for_batch(budget: u64, parts: Vec<Part>) -> Self {
        Self { parts, ..Self::new(budget, CancelToken::new(), None) }
    }

    /// Whether row `row` of a batched pass is still wanted by its caller (always true outside
    /// a batch). Backends that can drop rows between layers ask this at their checkpoints.
    pub fn row_wanted(&self, row: usize) -> bool {
        let now = Instant::now();
        self.parts.iter().find(|p| p.rows.contains(&row)).is_none_or(|p| p.wanted(now))
    }

    /// Whether this meter serves several callers' rows (see [`Meter::for_batch`]).
    pub fn is_batch(&self) -> bool {
        self.parts.len() > 1
    }

    /// A model load under `budget` bytes (constant folding, converted weights).
    pub fn for_load(budget: u64, token: CancelToken, deadline: Option<Instant>) -> Self {
        Self { what: "load", ..Self::new(budget, token, deadline) }
    }

    /// No deadline and a budget of `budget` bytes (benchmarks, tests, direct callers).
    pub fn with_budget(budget: u64) -> Self {
        Self::new(budget, CancelToken::new(), None)
    }

    /// Bytes reserved right now.
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// The most bytes reserved at once so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Ends the work if the deadline passed or the caller cancelled it; steps aside while a
    /// later priority pass runs ([`Meter::yielding_to`]). `at` names where (a node, a layer)
    /// for the message. Backends call it between layers or operators, never from inside a
    /// parallel piece of one: a piece that waited could be running on top of the priority
    /// pass's own thread, and would wait for itself.
    pub fn checkpoint(&self, at: &dyn std::fmt::Display) -> Result<(), NnError> {
        self.check(at)?;
        let Some((running, seen, account)) = &self.yield_to else { return Ok(()) };
        let urgent = || running.load(Ordering::Acquire) > *seen;
        if !urgent() {
            return Ok(());
        }
        account.stand_aside();
        let result = loop {
            if let Err(e) = self.check(at) {
                break Err(e);
            }
            if !urgent() {
                break Ok(());
            }
            // Run pool work meanwhile (outside the pool, or with none queued, nap briefly).
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::thread::sleep(Duration::from_micros(100));
            }
        };
        account.resume();
        result
    }

    fn check(&self, at: &dyn std::fmt::Display) -> Result<(), NnError> {
        if self.token.is_cancelled() {
            return Err(NnError::timeout(format!("the {} was cancelled (stopped before {at})", self.what)));
        }
        // The clock is read only where something depends on it: a checkpoint runs between
        // every two operators (Silero's chunk: about 60), and reading it was 2% of a chunk.
        if self.deadline.is_none() && self.parts.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            return Err(NnError::timeout(format!(
                "the deadline passed during the {} (stopped before {at})",
                self.what
            )));
        }
        if !self.parts.is_empty() && !self.parts.iter().any(|p| p.wanted(now)) {
            return Err(NnError::timeout(format!(
                "every caller of this batched {} stopped waiting (stopped before {at})",
                self.what
            )));
        }
        Ok(())
    }

    /// Reserves `bytes` for `what` until the returned charge is dropped (or
    /// [`Charge::keep`] makes it permanent), or refuses with `too-large` when that would take
    /// the reserved total past the budget. Nothing is reserved on refusal.
    pub fn reserve(&self, bytes: u64, what: &dyn std::fmt::Display) -> Result<Charge<'_>, NnError> {
        let mut live = self.live.load(Ordering::Relaxed);
        loop {
            let next = live.checked_add(bytes).filter(|&n| n <= self.budget).ok_or_else(|| {
                NnError::too_large(format!(
                    "{what} needs {} on top of {} in use, over this {}'s memory budget of {} \
                     (send a smaller batch or input, or raise `max_compute_memory`)",
                    human(bytes),
                    human(live),
                    self.what,
                    human(self.budget)
                ))
            })?;
            match self.live.compare_exchange_weak(live, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    // Most reservations stay under the peak: a plain load spares them a
                    // locked read-modify-write (two per operator).
                    if next > self.peak.load(Ordering::Relaxed) {
                        self.peak.fetch_max(next, Ordering::Relaxed);
                    }
                    return Ok(Charge { meter: self, bytes });
                }
                Err(now) => live = now,
            }
        }
    }

    fn release(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Bytes reserved on a [`Meter`], given back when dropped.
#[derive(Debug)]
#[must_use = "a charge is released when dropped"]
pub struct Charge<'m> {
    meter: &'m Meter,
    bytes: u64,
}

impl Charge<'_> {
    /// Keeps the bytes reserved for the rest of the meter's life.
    pub fn keep(mut self) {
        self.bytes = 0;
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.meter.release(self.bytes);
    }
}

/// Elements of a tensor with `dims`, or `None` when the product overflows.
pub fn elements(dims: &[usize]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
}

/// Bytes of a tensor with `dims` and `elem` bytes per element, or a `too-large` error naming
/// `what` when the size does not fit in 64 bits.
pub fn bytes_of(dims: &[usize], elem: usize, what: &dyn std::fmt::Display) -> Result<u64, NnError> {
    elements(dims)
        .and_then(|n| n.checked_mul(elem as u64))
        .ok_or_else(|| NnError::too_large(format!("{what}: a tensor of shape {dims:?} does not fit in memory")))
}

/// `a · b` for sizes, or `too-large` naming `what`.
pub fn mul(a: u64, b: u64, what: &dyn std::fmt::Display) -> Result<u64, NnError> {
    a.checked_mul(b).ok_or_else(|| NnError::too_large(format!("{what}: size overflows")))
}

/// Bytes in plain units for messages.
fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).to_string()
}

/// The cores' time, shared out among the passes running at once: while `n` passes run (none
/// of them standing aside), each accrues `cores / n` core-seconds per second. A pass's
/// [`Occupancy`] is what it is charged: the cores it actually shared, however many passes
/// started, ended or stood aside while it ran.
#[derive(Debug)]
pub struct ShareClock {
    cores: f64,
    state: Mutex<Clock>,
}

#[derive(Debug)]
struct Clock {
    /// Core-seconds one pass would have accrued, had it run since the clock began.
    total: f64,
    /// Passes running and not standing aside.
    running: usize,
    at: Instant,
}

impl ShareClock {
    /// A clock over `cores` cores (at least one).
    pub fn new(cores: usize) -> Arc<Self> {
        let state = Clock { total: 0.0, running: 0, at: Instant::now() };
        Arc::new(Self { cores: cores.max(1) as f64, state: Mutex::new(state) })
    }

    /// The clock, brought up to now.
    fn now(&self) -> MutexGuard<'_, Clock> {
        let mut c = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if c.running > 0 {
            c.total += now.saturating_duration_since(c.at).as_secs_f64() * self.cores / c.running as f64;
        }
        c.at = now;
        c
    }
}

/// One pass's account on a [`ShareClock`]: it runs from [`start`](Self::start) to
/// [`finish`](Self::finish), except while it stands aside at a checkpoint.
#[derive(Debug)]
pub struct Occupancy {
    clock: Arc<ShareClock>,
    state: Mutex<Account>,
}

#[derive(Debug, Clone, Copy)]
enum Account {
    /// Sharing the cores since the clock read `mark`, with `before` accrued until then.
    Running { mark: f64, before: f64 },
    /// Standing aside, with `accrued` so far.
    Aside { accrued: f64 },
    /// Ended: nothing moves it any more.
    Finished { accrued: f64 },
}

impl Occupancy {
    /// A pass that begins running now.
    pub fn start(clock: &Arc<ShareClock>) -> Arc<Self> {
        let account = Arc::new(Self { clock: clock.clone(), state: Mutex::new(Account::Aside { accrued: 0.0 }) });
        account.resume();
        account
    }

    fn state(&self) -> MutexGuard<'_, Account> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Leaves the clock if running: what the pass has accrued.
    fn leave(&self, st: Account) -> f64 {
        match st {
            Account::Running { mark, before } => {
                let mut clock = self.clock.now();
                clock.running = clock.running.saturating_sub(1);
                before + (clock.total - mark)
            }
            Account::Aside { accrued } | Account::Finished { accrued } => accrued,
        }
    }

    /// The pass stops sharing the cores (waiting for a priority pass).
    fn stand_aside(&self) {
        let mut st = self.state();
        if let Account::Running { .. } = *st {
            *st = Account::Aside { accrued: self.leave(*st) };
        }
    }

    /// The pass shares the cores again (not once it finished).
    fn resume(&self) {
        let mut st = self.state();
        if let Account::Aside { accrued } = *st {
            let mut clock = self.clock.now();
            clock.running += 1;
            *st = Account::Running { mark: clock.total, before: accrued };
        }
    }

    /// Ends the pass: the core-seconds it accrued.
    pub fn finish(&self) -> f64 {
        let mut st = self.state();
        let accrued = self.leave(*st);
        *st = Account::Finished { accrued };
        accrued
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_yielding_checkpoint_waits_only_for_a_later_priority_pass_and_still_stops_when_cancelled() {
        let running = Arc::new(AtomicU64::new(0));
        let clock = ShareClock::new(1);
        let account = Occupancy::start(&clock);
        let started = Instant::now();
        // No priority pass, or one launched before this work began: no wait (were there one,
        // nothing would end it and the test would hang).
        let m = Meter::with_budget(1).yielding_to(running.clone(), 3, account.clone());
        m.checkpoint(&"a").unwrap();
        running.store(3, Ordering::Release);
        m.checkpoint(&"b").unwrap();
        // A later one: the checkpoint waits until it ends, standing aside meanwhile.
        running.store(4, Ordering::Release);
        let release = {
            let running = running.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                running.store(0, Ordering::Release);
            })
        };
        m.checkpoint(&"c").unwrap();
        release.join().unwrap();
        let (accrued, elapsed) = (account.finish(), started.elapsed().as_secs_f64());
        // It stood aside for at least the 30 ms before the release.
        assert!(accrued <= elapsed - 0.03, "the wait is not accrued: {accrued} of {elapsed} s");
        // Cancelled while it waits: the work ends with its error.
        let token = CancelToken::new();
        let m = Meter::new(1, token.clone(), None).yielding_to(running.clone(), 0, Occupancy::start(&clock));
        running.store(1, Ordering::Release);
        let cancel = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            token.cancel();
        });
        let err = m.checkpoint(&"d").unwrap_err();
        cancel.join().unwrap();
        assert_eq!(crate::nn::code_name(err.code), "timeout");
    }

    #[test]
    fn passes_side_by_side_share_the_cores_in_what_they_accrue() {
        // Every bound comes from clock readings taken just before and after each event, so a
        // thread preempted anywhere (sleeps overrunning included) cannot break it.
        const EPS: f64 = 1e-6;
        let clock = ShareClock::new(2);
        let t = Instant::now();
        let secs = || t.elapsed().as_secs_f64();
        let (a, b) = (Occupancy::start(&clock), Occupancy::start(&clock));
        let started = secs();
        std::thread::sleep(Duration::from_millis(40));
        let lo_b = secs();
        let b = b.finish();
        let hi_b = secs();
        std::thread::sleep(Duration::from_millis(40));
        let lo_a = secs();
        let a = a.finish();
        let hi_a = secs();
        // `b` ran beside `a` throughout: one core from its start to its finish.
        assert!(lo_b - started - EPS <= b && b <= hi_b + EPS, "{b} not in [{}, {hi_b}]", lo_b - started);
        // `a` had one core beside `b`, then both (and both before `b` started, at most `started`).
        let (least, most) = (2.0 * lo_a - hi_b - started, 2.0 * hi_a - lo_b + started);
        assert!(least - EPS <= a && a <= most + EPS, "{a} not in [{least}, {most}]");

        // Standing aside accrues nothing, and leaves the cores to the others.
        let t = Instant::now();
        let secs = || t.elapsed().as_secs_f64();
        let (c, d) = (Occupancy::start(&clock), Occupancy::start(&clock));
        c.stand_aside();
        let aside_from = secs();
        std::thread::sleep(Duration::from_millis(40));
        let aside_to = secs();
        c.resume();
        let c = c.finish();
        let c_done = secs();
        d.finish();
        let d = d.finish(); // finishing twice changes nothing
        assert!(c <= 2.0 * aside_from + (c_done - aside_to) + EPS, "{c}: nothing while it stood aside");
        assert!(d >= 2.0 * (aside_to - aside_from) - EPS, "{d}: both cores while `c` stood aside");

        // A finished account stays out of the clock, even if resumed: the next pass has both
        // cores (counted as running, `e` would halve them).
        let e = Occupancy::start(&clock);
        e.finish();
        e.resume();
        let t = Instant::now();
        let g = Occupancy::start(&clock);
        let began = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(20));
        let ended = t.elapsed().as_secs_f64();
        let g = g.finish();
        assert!(g >= 2.0 * (ended - began) - EPS, "{g}: both cores for at least {} s", ended - began);
    }

    use super::*;

    #[test]
    fn reservations_are_bounded_and_released() {
        let m = Meter::with_budget(100);
        let a = m.reserve(60, &"a").unwrap();
        let err = m.reserve(41, &"b").unwrap_err();
        assert_eq!(err.code, crate::nn::bindings::errors::ErrorCode::TooLarge);
        assert!(err.message.contains("max_compute_memory"), "{err}");
        assert_eq!(m.live(), 60, "a refusal reserves nothing");
        drop(a);
        assert_eq!(m.live(), 0);
        m.reserve(100, &"c").unwrap().keep();
        assert_eq!((m.live(), m.peak()), (100, 100));
        assert!(m.reserve(u64::MAX, &"d").is_err(), "no overflow");
    }

    #[test]
    fn checkpoints_stop_cancelled_and_late_work() {
        let token = CancelToken::new();
        let m = Meter::new(1, token.clone(), None);
        m.checkpoint(&"layer 0").unwrap();
        drop(token.cancel_on_drop());
        let err = m.checkpoint(&"layer 1").unwrap_err();
        assert_eq!(err.code, crate::nn::bindings::errors::ErrorCode::Timeout);
        assert!(err.message.contains("layer 1"), "{err}");
        let late = Meter::new(1, CancelToken::new(), Some(Instant::now()));
        assert!(late.checkpoint(&"x").is_err());
        let t = CancelToken::new();
        t.cancel_on_drop().disarm();
        assert!(!t.is_cancelled(), "a disarmed guard does not cancel");
    }

    #[tokio::test]
    async fn a_cancel_wakes_its_waiters() {
        let token = CancelToken::new();
        let waiter = tokio::spawn({
            let token = token.clone();
            async move { token.cancelled().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(!waiter.is_finished(), "nothing cancelled yet");
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("woken").unwrap();
        // Already cancelled: completes at once.
        token.cancelled().await;
    }

    #[test]
    fn a_batch_runs_while_any_caller_wants_it() {
        let (a, b) = (CancelToken::new(), CancelToken::new());
        let parts = vec![
            Part { rows: 0..2, token: a.clone(), deadline: None },
            Part { rows: 2..3, token: b.clone(), deadline: None },
        ];
        let m = Meter::for_batch(1, parts);
        assert!(m.is_batch());
        a.cancel();
        assert!(!m.row_wanted(0) && !m.row_wanted(1) && m.row_wanted(2));
        m.checkpoint(&"layer 0").expect("b still waits");
        b.cancel();
        assert!(m.checkpoint(&"layer 1").unwrap_err().message.contains("every caller"));
        let late =
            Meter::for_batch(1, vec![Part { rows: 0..1, token: CancelToken::new(), deadline: Some(Instant::now()) }]);
        assert!(late.checkpoint(&"x").is_err(), "a passed deadline counts as gone");
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(elements(&[2, 3, 4]), Some(24));
        assert_eq!(elements(&[]), Some(1));
        assert_eq!(elements(&[usize::MAX, 2]), None);
        assert!(bytes_of(&[1 << 40, 1 << 30], 4, &"t").is_err());
        assert_eq!(bytes_of(&[10], 8, &"t").unwrap(), 80);
    }
}
