//! The scheduler: the one place that admits, batches, shares and cancels compute.
//!
//! Every forward pass a plugin asks for (`wasi:nn` compute, either ABI) becomes a [`Job`]: its
//! model, inputs, tenant, deadline, memory budget and a cancellation token. Jobs wait in one
//! queue per model. One dispatcher thread forms passes from them and hands each to the compute
//! pool (rayon's, sized to the cores; the kernels' own parallel loops run in the same pool, so
//! batched and parallel work never oversubscribe), at most [`Settings::max_running`] at once:
//!
//! - **Fair share**: the next pass starts with the queued job of the tenant that has received
//!   the least compute for its weight (start-time fair queuing over measured core-seconds; a
//!   tenant that was idle resumes at the current virtual time, so it cannot bank credit).
//! - **Dynamic batching**: that job's pass takes every compatible job queued for the same model
//!   (any plugin, any tenant, fairest first) up to the model's `max_batch` rows, per the
//!   model's [`BatchSpec`](crate::nn::backend::BatchSpec); see [`batch`]. A lone job starts at
//!   once; the pass waits for company only when the model sets `max_delay`.
//! - **Admission by memory**: a pass starts only if its estimated activation memory fits what
//!   is left of [`Settings::memory`]; a batch that does not fit shrinks, and a job bigger than
//!   the whole budget is refused (`too-large`).
//! - **Cancellation**: a job whose caller went away (or whose deadline passed) leaves its queue
//!   without computing; in a running pass its rows are dropped at the next layer boundary
//!   where the backend can ([`Meter::row_wanted`]), and the pass stops once no caller wants it.
//! - **Charging**: the cores' time a pass had (each second shared equally among the passes
//!   running then, none while it stood aside: [`ShareClock`]) is split over its jobs by
//!   their tokens and charged to their tenants, abandoned work included, so dropping and
//!   resending requests gains nothing. The tenant's optional quota (core-seconds per minute)
//!   is checked by the gateway before a request runs ([`Tenant::over_quota`]).

mod awake;
pub mod batch;
mod blocking;
mod metrics;
mod tenant;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::nn::NnError;
use crate::nn::backend::{BatchSpec, Model, Named};
use crate::nn::meter::{CancelOnDrop, CancelToken, Meter, Occupancy, Part, ShareClock};
pub use awake::{Awake, IDLE_LIMIT};
pub use blocking::BlockingPool;
pub use metrics::Metrics;
pub use tenant::{LOCAL, OnCpu, Tenant, Turn, TurnSlot, on_cpu, without_turn};

/// Keeps candle's element-wise kernels off a thread pool of their own, unless
/// `CANDLE_NUM_THREADS` says otherwise. candle 0.11 runs them on spinning threads beside
/// rayon's (which the scheduler and EIR's kernels share); two pools on the same cores
/// oversubscribe them and spin: measured on 2 cores, text-embed at 32 connections served
/// 197 req/s with it and 265 without, and an EfficientNet pass spent 3% of its samples in that
/// pool's residual additions. The `eir` binary and the benchmarks call it first thing.
///
/// # Safety
/// No other thread that could read the environment may run yet (it sets an environment
/// variable); jemalloc's background thread, which may already exist, does not.
pub unsafe fn one_compute_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees that no other thread reads the environment yet.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// How a model batches (`max_batch`, `max_delay` in its `[models.NAME]` section).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchPolicy {
    /// Most rows one pass runs (1 turns batching off).
    pub max_batch: usize,
    /// How long the first job of a pass may wait for company before it starts anyway (0: a
    /// pass takes what is queued and starts at once).
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self { max_batch: 32, max_delay: Duration::ZERO }
    }
}

/// Host-wide settings of a scheduler.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Passes running at once (each on the shared compute pool).
    pub max_running: usize,
    /// Bytes of activations all running passes may hold together (estimated per pass).
    pub memory: u64,
    /// Whether the pool's other threads spin while a pass runs alone ([`Awake`]).
    pub spin: bool,
}

/// The in-flight activation budget when nothing else is configured.
pub const DEFAULT_MEMORY: u64 = 4 << 30;

impl Settings {
    /// One pass per core, [`DEFAULT_MEMORY`].
    pub fn for_this_machine() -> Self {
        Self { max_running: cores(), memory: DEFAULT_MEMORY, spin: true }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// One forward pass a caller asks for.
pub struct Job {
    /// The model.
    pub model: Arc<dyn Model>,
    /// Its name (metrics, learned estimates).
    pub name: Arc<str>,
    /// How it batches.
    pub policy: BatchPolicy,
    /// The caller's inputs.
    pub inputs: Named,
    /// Who pays for it.
    pub tenant: Arc<Tenant>,
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
    /// Bytes of intermediate values this caller's rows may hold (`max_compute_memory`).
    pub budget: u64,
}

/// Schedules compute jobs. Cheap to clone; the dispatcher stops when the last clone drops.
#[derive(Clone)]
pub struct Scheduler {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("settings", &self.handle.shared.settings).finish_non_exhaustive()
    }
}

struct Handle {
    shared: Arc<Shared>,
    loads: BlockingPool,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.shutdown = true;
        }
        self.shared.wake.notify_all();
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    settings: Settings,
    metrics: Metrics,
    /// The number of the priority pass running (0: none): passes that began before it step
    /// aside at their checkpoints.
    urgent: Arc<AtomicU64>,
    /// Priority passes launched so far (the last one's number).
    priorities: AtomicU64,
    /// The cores' time as the running passes share it: what each pass is charged.
    clock: Arc<ShareClock>,
    /// Keeps the pool's other threads awake while a pass runs alone.
    awake: Awake,
}

#[derive(Default)]
struct State {
    queues: Vec<ModelQueue>,
    tenants: HashMap<Arc<str>, Arc<Tenant>>,
    /// Each tenant's virtual time: compute received / weight, in core-seconds.
    vtime: HashMap<Arc<str>, f64>,
    /// Jobs each tenant has queued or running.
    active: HashMap<Arc<str>, usize>,
    /// The start tag of the last pass: where an idle tenant resumes.
    vclock: f64,
    running: usize,
    /// Passes running per tenant (a pass counts for each tenant it carries).
    busy: HashMap<Arc<str>, usize>,
    memory: u64,
    next: u64,
    /// Passes started and the rows they carried, since the start.
    passes: u64,
    rows: u64,
    learned: HashMap<Arc<str>, Learned>,
    shutdown: bool,
}

/// What past passes of a model taught (keyed by model name).
#[derive(Clone, Copy, Debug)]
struct Learned {
    /// Core-seconds per token (EWMA).
    seconds: f64,
    /// Most bytes per token a pass held.
    bytes: f64,
    /// Whether its outputs split as its spec says (a model that fails once runs alone).
    batches: bool,
}

impl Default for Learned {
    fn default() -> Self {
        Self { seconds: 0.0, bytes: 0.0, batches: true }
    }
}

struct ModelQueue {
    model: Arc<dyn Model>,
    name: Arc<str>,
    policy: BatchPolicy,
    spec: Option<BatchSpec>,
    jobs: Vec<Queued>,
}

struct Queued {
    id: u64,
    inputs: Named,
    shape: Option<batch::Shape>,
    units: u64,
    tenant: Arc<Tenant>,
    token: CancelToken,
    deadline: Option<Instant>,
    budget: u64,
    at: Instant,
    reply: tokio::sync::oneshot::Sender<Result<Named, NnError>>,
    /// Core-seconds charged at dispatch (corrected when the pass ends).
    estimate: f64,
}

impl Queued {
    fn wanted(&self, now: Instant) -> bool {
        !self.token.is_cancelled() && self.deadline.is_none_or(|d| now < d)
    }

    fn rows(&self) -> usize {
        self.shape.as_ref().map_or(1, |s| s.rows)
    }
}

/// A priority pass `behind_waits` approved: its head job, and the virtual time its tenant
/// may reach with companions of its own (the running tenants' least).
#[derive(Clone, Copy)]
struct Priority {
    job: u64,
    until: f64,
}

/// A pass on its way to the pool.
struct Pass {
    model: Arc<dyn Model>,
    name: Arc<str>,
    spec: Option<BatchSpec>,
    jobs: Vec<Queued>,
    bytes: u64,
    /// Let in past `max_running` for a tenant behind its share; the others step aside.
    priority: bool,
}

enum Pick {
    Pass(Pass),
    /// Something changed (a job was refused): look again.
    Again,
    /// Nothing may start before this instant (a batching window) or a completion.
    Wait(Option<Instant>),
}

impl Scheduler {
    /// A scheduler with `settings`, computing on rayon's global pool.
    pub fn new(settings: Settings) -> Self {
        let settings = Settings { max_running: settings.max_running.max(1), ..settings };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            settings,
            metrics: Metrics::default(),
            urgent: Arc::new(AtomicU64::new(0)),
            priorities: AtomicU64::new(0),
            clock: ShareClock::new(cores()),
            awake: Awake::new(settings.spin),
        });
        let dispatcher = shared.clone();
        if let Err(e) = std::thread::Builder::new().name("eir-scheduler".into()).spawn(move || dispatcher.dispatch()) {
            // Without a dispatcher every job would wait forever: fail them instead.
            tracing::error!(error = %e, "cannot start the scheduler thread");
            if let Ok(mut st) = shared.state.lock() {
                st.shutdown = true;
            }
        }
        Self { handle: Arc::new(Handle { shared, loads: BlockingPool::new(settings.max_running) }) }
    }

    /// A scheduler sized to this machine ([`Settings::for_this_machine`]).
    pub fn for_this_machine() -> Self {
        Self::new(Settings::for_this_machine())
    }

    /// Its settings.
    pub fn settings(&self) -> Settings {
        self.handle.shared.settings
    }

    /// The metrics (register them into a Prometheus registry).
    pub fn metrics(&self) -> &Metrics {
        &self.handle.shared.metrics
    }

    /// The pool model loads run on (blocking work that is not a forward pass).
    pub fn loads(&self) -> &BlockingPool {
        &self.handle.loads
    }

    /// The account of tenant `name`, created (weight 1, no quota) on first use.
    pub fn tenant(&self, name: &str) -> Arc<Tenant> {
        let Ok(mut st) = self.handle.shared.state.lock() else { return Arc::new(Tenant::new(name)) };
        if let Some(t) = st.tenants.get(name) {
            return t.clone();
        }
        let t = Arc::new(Tenant::new(name));
        st.tenants.insert(t.name_arc(), t.clone());
        t
    }

    /// Charges `seconds` of CPU spent running `tenant`'s plugin code (abandoned calls
    /// included): to its usage and compute quota, and to its place in the fair share, so that
    /// a tenant burning the cores in WebAssembly waits longer for its forward passes.
    pub fn charge_plugin(&self, tenant: &Tenant, seconds: f64) {
        let seconds = seconds.max(0.0);
        if seconds == 0.0 {
            return;
        }
        let shared = &self.handle.shared;
        if let Some(v) = shared.lock().vtime.get_mut(tenant.name()) {
            *v += seconds / tenant.weight();
        }
        tenant.charge(seconds);
        shared.metrics.plugin_charged(tenant.name(), seconds);
    }

    /// Runs `job`, batched with others where its model allows. Dropping the returned future
    /// (the caller timed out or went away) cancels the job: queued, it never computes; running,
    /// its rows are dropped or the pass stops at the next checkpoint.
    pub fn submit(&self, job: Job) -> impl Future<Output = Result<Named, NnError>> + Send + 'static {
        let token = CancelToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = self.handle.shared.clone();
        let waiting = Waiting { shared: shared.clone(), cancel: Some(token.cancel_on_drop()) };
        shared.enqueue(job, token, tx);
        async move {
            let answer = rx.await;
            waiting.done();
            answer.unwrap_or_else(|_| Err(NnError::runtime("the scheduler stopped before the job ran")))
        }
    }

    /// Passes started so far and the rows they carried (rows / passes is the mean batch).
    pub fn passes(&self) -> (u64, u64) {
        let Ok(st) = self.handle.shared.state.lock() else { return (0, 0) };
        (st.passes, st.rows)
    }

    /// Jobs queued (not yet running) for the model called `name`.
    pub fn queued(&self, name: &str) -> usize {
        let Ok(st) = self.handle.shared.state.lock() else { return 0 };
        st.queues.iter().filter(|q| &*q.name == name).map(|q| q.jobs.len()).sum()
    }
}

/// Held by a waiting caller: dropping it early cancels the job (as [`CancelOnDrop`]) and wakes
/// the dispatcher, which takes a queued job out at once.
struct Waiting {
    shared: Arc<Shared>,
    cancel: Option<CancelOnDrop>,
}

impl Waiting {
    fn done(mut self) {
        if let Some(cancel) = self.cancel.take() {
            cancel.disarm();
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.cancel.take().is_some() {
            self.shared.wake.notify_all();
        }
    }
}

/// Rows of a job that cannot batch: its first input's first dimension, else 1.
fn rows_of(inputs: &Named) -> u64 {
    inputs.first().and_then(|(_, t)| t.dims().first()).map_or(1, |&d| u64::from(d.max(1)))
}

fn panic_message(what: Box<dyn std::any::Any + Send>) -> String {
    what.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| what.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs one compute, turning a panic into a `runtime-error` (the host carries on).
fn guarded(model: &dyn Model, inputs: Named, meter: &Meter) -> Result<Named, NnError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.compute_with(inputs, meter))) {
        Ok(result) => result,
        Err(what) => {
            let message = panic_message(what);
            tracing::error!(%message, "a backend panicked; the request failed, the host carries on");
            Err(NnError::runtime(format!("the backend failed unexpectedly: {message}")))
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state holds no invariant a panicking holder could break halfway that matters
        // more than serving: carry on with it.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enqueue(&self, job: Job, token: CancelToken, reply: tokio::sync::oneshot::Sender<Result<Named, NnError>>) {
        let mut st = self.lock();
        if st.shutdown {
            let _ = reply.send(Err(NnError::runtime("the scheduler is shut down")));
            return;
        }
        let learned = st.learned.get(&job.name).copied().unwrap_or_default();
        let qi = match st.queues.iter().position(|q| Arc::ptr_eq(&q.model, &job.model)) {
            Some(i) => i,
            None => {
                let spec = if learned.batches { job.model.batching() } else { None };
                st.queues.push(ModelQueue {
                    model: job.model.clone(),
                    name: job.name.clone(),
                    policy: job.policy,
                    spec,
                    jobs: Vec::new(),
                });
                st.queues.len() - 1
            }
        };
        // The newest job's policy is the model's (a reload may have changed `max_batch` or
        // `max_delay` while jobs under the old one still wait).
        st.queues[qi].policy = job.policy;
        let shape = match (&st.queues[qi].spec, job.policy.max_batch > 1) {
            (Some(spec), true) => batch::shape_of(spec, &job.inputs),
            _ => None,
        };
        let units = shape.as_ref().map_or_else(|| rows_of(&job.inputs), batch::Shape::units);
        let name = job.tenant.name_arc();
        let vclock = st.vclock;
        let active = st.active.entry(name.clone()).or_insert(0);
        *active += 1;
        if *active == 1 {
            // Back from idle: resume at the current virtual time, with no banked credit.
            let v = st.vtime.entry(name).or_insert(vclock);
            *v = v.max(vclock);
        }
        st.next += 1;
        let id = st.next;
        self.metrics.depth(&job.name, 1);
        st.queues[qi].jobs.push(Queued {
            id,
            inputs: job.inputs,
            shape,
            units,
            tenant: job.tenant,
            token,
            deadline: job.deadline,
            budget: job.budget,
            at: Instant::now(),
            reply,
            estimate: 0.0,
        });
        drop(st);
        self.wake.notify_all();
    }

    /// The dispatcher thread: sweeps out abandoned jobs, starts passes while there is room,
    /// and sleeps until a job arrives, a pass ends or a batching window closes.
    fn dispatch(self: Arc<Self>) {
        let mut st = self.lock();
        loop {
            if st.shutdown {
                for q in std::mem::take(&mut st.queues) {
                    for job in q.jobs {
                        let _ = job.reply.send(Err(NnError::runtime("the scheduler is shutting down")));
                    }
                }
                return;
            }
            let now = Instant::now();
            self.sweep(&mut st, now);
            let mut until = None;
            loop {
                // A free slot takes the fairest pass; with none, only a priority pass for the
                // one job `behind_waits` approved may start.
                let only = if st.running < self.settings.max_running {
                    None
                } else {
                    match self.behind_waits(&st) {
                        Some(approved) => Some(approved),
                        None => break,
                    }
                };
                match self.pick(&mut st, now, only) {
                    Pick::Pass(mut pass) => {
                        pass.priority = only.is_some();
                        self.launch(&mut st, pass)
                    }
                    Pick::Again => continue,
                    Pick::Wait(at) => {
                        until = at;
                        break;
                    }
                }
            }
            st = match until {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    self.wake.wait_timeout(st, wait).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0)
                }
                None => self.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// With every pass slot taken: the fairest queued job, if its tenant is behind every
    /// tenant with a running pass even once this job is charged (its finish tag is no later
    /// than theirs, which include their running passes: it came back from idle, or they got
    /// ahead), and has nothing running itself. Its pass is then let in as a priority pass (one
    /// at a time), and the running passes step aside at their next checkpoint until it ends
    /// ([`Meter::yielding_to`]): passes cannot be interrupted mid-layer, but a tenant within
    /// its share should not wait out, or share the cores with, the passes of tenants that have
    /// had more. Serving the smallest finish tag first is weighted fair queuing's own order;
    /// each priority pass moves its tenant ahead by its cost while the paused tenants stand
    /// still, so priority passes cannot starve the others beyond the fair-share lag.
    fn behind_waits(&self, st: &State) -> Option<Priority> {
        // One priority pass at a time.
        if self.urgent.load(Ordering::Acquire) != 0 || st.busy.is_empty() {
            return None;
        }
        let vtime = |name: &str| st.vtime.get(name).copied().unwrap_or(0.0);
        let running = st.busy.keys().map(|n| vtime(n)).fold(f64::INFINITY, f64::min);
        // The fairest job in `pick`'s own order (virtual time, then arrival).
        let (q, job) =
            st.queues.iter().flat_map(|q| q.jobs.iter().map(move |j| (q, j))).min_by(|a, b| {
                vtime(a.1.tenant.name()).total_cmp(&vtime(b.1.tenant.name())).then(a.1.id.cmp(&b.1.id))
            })?;
        let learned = st.learned.get(&q.name).copied().unwrap_or_default();
        // A model without a finished pass has no cost yet: nothing to judge by.
        if learned.seconds <= 0.0 || st.busy.contains_key(job.tenant.name()) {
            return None;
        }
        let cost = learned.seconds * job.units as f64 / job.tenant.weight();
        (vtime(job.tenant.name()) + cost <= running + 1e-9).then_some(Priority { job: job.id, until: running })
    }

    /// Answers and removes queued jobs nobody waits for.
    fn sweep(&self, st: &mut State, now: Instant) {
        let mut gone = Vec::new();
        for q in &mut st.queues {
            let mut i = 0;
            while i < q.jobs.len() {
                if q.jobs[i].wanted(now) {
                    i += 1;
                    continue;
                }
                let job = q.jobs.remove(i);
                self.metrics.depth(&q.name, -1);
                self.metrics.cancelled(job.tenant.name(), "queued");
                let _ = job.reply.send(Err(NnError::timeout("the caller stopped waiting before the job started")));
                gone.push(job.tenant.name_arc());
            }
        }
        for name in gone {
            deactivate(st, &name);
        }
        // A model without waiting jobs is not held on to (it may have been unloaded).
        st.queues.retain(|q| !q.jobs.is_empty());
    }

    /// The next pass to start, fairest tenant first.
    /// With `only`, the pass of that one job (a priority pass), or nothing.
    fn pick(&self, st: &mut State, now: Instant, only: Option<Priority>) -> Pick {
        let vtime = |st: &State, t: &Tenant| st.vtime.get(t.name()).copied().unwrap_or(0.0);
        let mut order: Vec<(f64, u64, usize, usize)> = Vec::new();
        for (qi, q) in st.queues.iter().enumerate() {
            for (ji, job) in q.jobs.iter().enumerate() {
                order.push((vtime(st, &job.tenant), job.id, qi, ji));
            }
        }
        order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut window: Option<Instant> = None;
        let mut held: Vec<usize> = Vec::new();
        for &(_, id, qi, ji) in &order {
            if held.contains(&qi) || only.is_some_and(|p| p.job != id) {
                continue;
            }
            held.push(qi); // one candidate pass per model per round
            let q = &st.queues[qi];
            let head = &q.jobs[ji];
            // Companions: compatible jobs of the same model, fairest first, up to max_batch
            // rows, from tenants no further ahead in their share than the head's own job puts
            // its tenant: a tenant that has had more than its share must not ride along (its
            // rows would lengthen the pass of the tenant whose turn it is, ahead of its own).
            // A priority pass takes only its own tenant's jobs, and only while the tenant stays
            // behind the running ones.
            let learned = st.learned.get(&q.name).copied().unwrap_or_default();
            let cost = |j: &Queued| learned.seconds * j.units as f64 / j.tenant.weight();
            let head_v = vtime(st, &head.tenant);
            let reach = head_v + cost(head);
            let mut priority_v = reach;
            let mut members = vec![ji];
            let mut rows = head.rows();
            if let Some(shape) = &head.shape {
                for &(v, _, qj, jj) in &order {
                    if qj != qi || jj == ji {
                        continue;
                    }
                    let other = &q.jobs[jj];
                    let own = other.tenant.name() == head.tenant.name();
                    // (A margin for rounding: equal tags are the same round.)
                    if !own && (only.is_some() || v > reach + 1e-9) {
                        continue;
                    }
                    if let Some(p) = only
                        && priority_v + cost(other) > p.until + 1e-9
                    {
                        continue;
                    }
                    if other.shape.as_ref().is_some_and(|s| s.compatible(shape))
                        && rows + other.rows() <= q.policy.max_batch
                    {
                        members.push(jj);
                        rows += other.rows();
                        priority_v += cost(other);
                    }
                }
            }
            let delay = q.policy.max_delay;
            if !delay.is_zero() && rows < q.policy.max_batch && head.at + delay > now {
                let at = head.at + delay;
                window = Some(window.map_or(at, |w| w.min(at)));
                continue;
            }
            // Memory: shrink the batch until it fits what is left; refuse what never fits.
            let free = self.settings.memory.saturating_sub(st.memory);
            loop {
                let bytes = estimate(q, &members, &learned);
                if bytes <= free {
                    // Out of the queue (highest index first), then back in pass order.
                    let mut taken: Vec<(usize, usize)> = members.iter().copied().enumerate().collect();
                    taken.sort_unstable_by_key(|t| std::cmp::Reverse(t.1));
                    let q = &mut st.queues[qi];
                    let mut jobs: Vec<(usize, Queued)> =
                        taken.into_iter().map(|(k, i)| (k, q.jobs.remove(i))).collect();
                    jobs.sort_unstable_by_key(|(k, _)| *k);
                    let jobs = jobs.into_iter().map(|(_, j)| j).collect();
                    let pass = Pass {
                        model: q.model.clone(),
                        name: q.name.clone(),
                        spec: q.spec.clone(),
                        jobs,
                        bytes,
                        priority: false,
                    };
                    return Pick::Pass(pass);
                }
                if members.len() > 1 {
                    members.truncate(members.len().div_ceil(2));
                    continue;
                }
                if bytes > self.settings.memory {
                    let q = &mut st.queues[qi];
                    let job = q.jobs.remove(ji);
                    self.metrics.depth(&q.name, -1);
                    self.metrics.refused(job.tenant.name(), "memory");
                    let _ = job.reply.send(Err(NnError::too_large(format!(
                        "this compute needs about {} of activations, more than the host's in-flight budget of {}",
                        bytesize::ByteSize::b(bytes),
                        bytesize::ByteSize::b(self.settings.memory)
                    ))));
                    deactivate(st, &job.tenant.name_arc());
                    return Pick::Again;
                }
                // It fits once running passes end: nothing else starts before it.
                return Pick::Wait(window);
            }
        }
        Pick::Wait(window)
    }

    /// Starts `pass` on the compute pool, charging its estimate to its tenants now so that
    /// passes started before it ends see them as served.
    fn launch(self: &Arc<Self>, st: &mut State, mut pass: Pass) {
        let learned = st.learned.get(&pass.name).copied().unwrap_or_default();
        if let Some(first) = pass.jobs.first() {
            st.vclock = st.vtime.get(first.tenant.name()).copied().unwrap_or(st.vclock);
        }
        let now = Instant::now();
        for job in &mut pass.jobs {
            self.metrics.depth(&pass.name, -1);
            self.metrics.waited(&pass.name, now.saturating_duration_since(job.at).as_secs_f64());
            job.estimate = learned.seconds * job.units as f64;
            let v = st.vtime.entry(job.tenant.name_arc()).or_insert(0.0);
            *v += job.estimate / job.tenant.weight();
            *st.busy.entry(job.tenant.name_arc()).or_insert(0) += 1;
        }
        if pass.priority {
            let number = self.priorities.fetch_add(1, Ordering::AcqRel) + 1;
            self.urgent.store(number, Ordering::Release);
            let tenant = pass.jobs.first().map_or("", |j| j.tenant.name());
            tracing::debug!(model = %pass.name, tenant, rows = pass.jobs.len(), "a priority pass: the others step aside");
        }
        st.running += 1;
        st.passes += 1;
        st.rows += pass.jobs.iter().map(|j| j.rows() as u64).sum::<u64>();
        st.memory = st.memory.saturating_add(pass.bytes);
        let shared = self.clone();
        rayon::spawn(move || shared.execute(pass));
    }

    /// Runs a pass, answers its callers, and charges their tenants.
    fn execute(self: Arc<Self>, mut pass: Pass) {
        let mut peak = 0u64;
        // Charged: the cores' time this pass shared with the others running, not the time it
        // stood aside for a priority pass (that pass's, while it had the cores to itself).
        let account = Occupancy::start(&self.clock);
        let began = Instant::now();
        let answers = self.awake.run(|| self.compute(&mut pass, &mut peak, &account));
        let elapsed = account.finish();
        let units: u64 = pass.jobs.iter().map(|j| j.units).sum::<u64>().max(1);
        tracing::debug!(
            model = %pass.name,
            jobs = pass.jobs.len(),
            units,
            wall = ?began.elapsed(),
            charged = elapsed,
            "pass"
        );
        let now = Instant::now();
        let mut st = self.lock();
        st.running = st.running.saturating_sub(1);
        st.memory = st.memory.saturating_sub(pass.bytes);
        if pass.priority {
            self.urgent.store(0, Ordering::Release);
        }
        for job in &pass.jobs {
            let name = job.tenant.name_arc();
            if let Some(n) = st.busy.get_mut(&name) {
                *n -= 1;
                if *n == 0 {
                    st.busy.remove(&name);
                }
            }
        }
        let learned = st.learned.entry(pass.name.clone()).or_default();
        let per_unit = elapsed / units as f64;
        learned.seconds = if learned.seconds == 0.0 { per_unit } else { 0.7 * learned.seconds + 0.3 * per_unit };
        learned.bytes = learned.bytes.max(peak as f64 / units as f64);
        if answers.batch_failed {
            learned.batches = false;
            // Jobs already queued for it run alone too.
            if let Some(q) = st.queues.iter_mut().find(|q| Arc::ptr_eq(&q.model, &pass.model)) {
                q.spec = None;
                q.jobs.iter_mut().for_each(|j| j.shape = None);
            }
        }
        let mut replies = Vec::with_capacity(pass.jobs.len());
        for (job, answer) in pass.jobs.into_iter().zip(answers.each) {
            let charged = elapsed * job.units as f64 / units as f64;
            let name = job.tenant.name_arc();
            if let Some(v) = st.vtime.get_mut(&name) {
                *v += (charged - job.estimate) / job.tenant.weight();
            }
            deactivate(&mut st, &name);
            job.tenant.charge(charged);
            self.metrics.charged(job.tenant.name(), charged);
            if !job.wanted(now) {
                self.metrics.cancelled(job.tenant.name(), "running");
            }
            replies.push((job.reply, answer));
        }
        drop(st);
        self.wake.notify_all();
        for (reply, answer) in replies {
            let _ = reply.send(answer);
        }
    }

    /// The answers of a pass's jobs, in order: one batched pass when it has several jobs, and
    /// each alone when the batch cannot be formed, split, or fails (so that one caller's bad
    /// input never fails the others).
    fn compute(&self, pass: &mut Pass, peak: &mut u64, account: &Arc<Occupancy>) -> Answers {
        let model = pass.model.as_ref();
        // Priority passes launched before this one began are not its to wait for.
        let seen = self.priorities.load(Ordering::Acquire);
        let urgent = (!pass.priority).then(|| self.urgent.clone());
        let yielding = |meter: Meter| match &urgent {
            Some(running) => meter.yielding_to(running.clone(), seen, account.clone()),
            None => meter,
        };
        let alone = |job: &mut Queued, peak: &mut u64| {
            let meter = yielding(Meter::new(job.budget, job.token.clone(), job.deadline));
            let result = guarded(model, std::mem::take(&mut job.inputs), &meter);
            *peak = (*peak).max(meter.peak());
            result
        };
        if pass.jobs.len() == 1 {
            self.metrics.batch(&pass.name, pass.jobs[0].rows(), pass.jobs[0].units, 0);
            return Answers { each: vec![alone(&mut pass.jobs[0], peak)], batch_failed: false };
        }
        let Some(spec) = &pass.spec else {
            return Answers { each: pass.jobs.iter_mut().map(|j| alone(j, peak)).collect(), batch_failed: false };
        };
        // The callers keep their inputs (a failed batch reruns them alone); the pass gets a copy.
        let Some(calls) = pass.jobs.iter().map(|j| Some((&j.inputs, j.shape.as_ref()?))).collect::<Option<Vec<_>>>()
        else {
            return Answers { each: pass.jobs.iter_mut().map(|j| alone(j, peak)).collect(), batch_failed: false };
        };
        let (merged, layout) = match batch::merge(spec, &calls) {
            Ok(m) => m,
            Err(why) => {
                tracing::warn!(model = %pass.name, %why, "could not form a batch; running its jobs alone");
                return Answers { each: pass.jobs.iter_mut().map(|j| alone(j, peak)).collect(), batch_failed: true };
            }
        };
        let parts = layout
            .ranges()
            .into_iter()
            .zip(&pass.jobs)
            .map(|(rows, j)| Part { rows, token: j.token.clone(), deadline: j.deadline })
            .collect();
        let budget = pass.jobs.iter().fold(0u64, |sum, j| sum.saturating_add(j.budget));
        let meter = yielding(Meter::for_batch(budget, parts));
        let tokens: u64 = pass.jobs.iter().map(|j| j.units).sum();
        self.metrics.batch(&pass.name, layout.rows(), tokens, layout.padding());
        let result = guarded(model, merged, &meter);
        *peak = (*peak).max(meter.peak());
        match result {
            Ok(outputs) => match batch::split(spec, outputs, &layout) {
                Ok(each) => Answers { each: each.into_iter().map(Ok).collect(), batch_failed: false },
                Err(why) => {
                    tracing::warn!(model = %pass.name, %why, "a batched pass did not split; this model now runs unbatched");
                    Answers { each: pass.jobs.iter_mut().map(|j| alone(j, peak)).collect(), batch_failed: true }
                }
            },
            Err(e) if e.code == crate::nn::bindings::errors::ErrorCode::Timeout => {
                Answers { each: pass.jobs.iter().map(|_| Err(e.clone())).collect(), batch_failed: false }
            }
            // One caller's bad input (or a batch over the budget) must not fail the others:
            // each runs alone and gets its own answer.
            Err(_) => Answers { each: pass.jobs.iter_mut().map(|j| alone(j, peak)).collect(), batch_failed: false },
        }
    }
}

struct Answers {
    each: Vec<Result<Named, NnError>>,
    batch_failed: bool,
}

/// Estimated bytes of a pass over `members` of `q`: the model's own figure, else what its
/// past passes held per token (with a margin), else the callers' budgets.
fn estimate(q: &ModelQueue, members: &[usize], learned: &Learned) -> u64 {
    let jobs = members.iter().map(|&i| &q.jobs[i]);
    let rows: usize = jobs.clone().map(Queued::rows).sum();
    let seq = jobs.clone().filter_map(|j| j.shape.as_ref().map(|s| s.seq)).max().unwrap_or(0);
    if let Some(bytes) = q.model.pass_bytes(rows, seq) {
        return bytes;
    }
    if learned.bytes > 0.0 {
        let units = (rows as u64).saturating_mul(seq.max(1) as u64);
        return (learned.bytes * 1.25 * units as f64).min(u64::MAX as f64) as u64;
    }
    jobs.fold(0u64, |sum, j| sum.saturating_add(j.budget))
}

fn deactivate(st: &mut State, name: &Arc<str>) {
    if let Some(n) = st.active.get_mut(name) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            st.active.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::bindings::tensor::TensorType;
    use crate::nn::tensor::HostTensor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A model that doubles `x` ([rows, 1] f32), taking `ms` per pass with a checkpoint each
    /// millisecond, and logs which rows each pass carried.
    struct Doubler {
        ms: u64,
        passes: Mutex<Vec<Vec<f32>>>,
        /// Each pass that completed: its first row's value, when it began and when it ended.
        spans: Mutex<Vec<(f32, Instant, Instant)>>,
        bytes: Option<u64>,
    }

    impl Doubler {
        fn new(ms: u64) -> Arc<Self> {
            Arc::new(Self { ms, passes: Mutex::default(), spans: Mutex::default(), bytes: Some(1) })
        }

        /// Returns once `n` passes have begun (a test's cue, independent of timing).
        async fn started(&self, n: usize) {
            while self.passes.lock().unwrap().len() < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    impl Model for Doubler {
        fn family(&self) -> &'static str {
            "test"
        }
        fn input_names(&self) -> Vec<String> {
            vec!["x".into()]
        }
        fn batching(&self) -> Option<BatchSpec> {
            Some(BatchSpec { inputs: vec![("x".into(), false)], mask: None, outputs: vec![("y".into(), false)] })
        }
        fn pass_bytes(&self, rows: usize, _seq: usize) -> Option<u64> {
            self.bytes.map(|b| b * rows as u64)
        }
        fn compute_with(&self, inputs: Named, meter: &Meter) -> Result<Named, NnError> {
            let x: Vec<f32> =
                inputs[0].1.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            if x.iter().any(|v| v.is_nan()) {
                return Err(NnError::invalid_argument("NaN"));
            }
            self.passes.lock().unwrap().push(x.clone());
            let began = Instant::now();
            for i in 0..self.ms {
                meter.checkpoint(&format_args!("ms {i}"))?;
                std::thread::sleep(Duration::from_millis(1));
            }
            self.spans.lock().unwrap().push((x[0], began, Instant::now()));
            let y: Vec<u8> = x.iter().flat_map(|v| (v * 2.0).to_le_bytes()).collect();
            Ok(vec![("y".into(), HostTensor::new(vec![x.len() as u32, 1], TensorType::Fp32, y)?)])
        }
    }

    fn x(v: f32) -> Named {
        vec![("x".into(), HostTensor::new(vec![1, 1], TensorType::Fp32, v.to_le_bytes().to_vec()).unwrap())]
    }

    fn y(out: &Named) -> f32 {
        f32::from_le_bytes(out[0].1.data().try_into().unwrap())
    }

    fn job(model: &Arc<Doubler>, tenant: &Arc<Tenant>, v: f32, policy: BatchPolicy) -> Job {
        Job {
            model: model.clone(),
            name: "doubler".into(),
            policy,
            inputs: x(v),
            tenant: tenant.clone(),
            deadline: None,
            budget: 1 << 20,
        }
    }

    fn one_at_a_time() -> Scheduler {
        Scheduler::new(Settings { max_running: 1, memory: 1 << 30, spin: true })
    }

    #[tokio::test]
    async fn queued_jobs_batch_and_each_caller_gets_its_rows() {
        let s = one_at_a_time();
        let m = Doubler::new(30);
        let (a, b) = (s.tenant("a"), s.tenant("b"));
        let first = s.submit(job(&m, &a, 1.0, BatchPolicy::default()));
        // While the first pass runs, three more queue (two tenants): they share the next.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let rest: Vec<_> = [(2.0, &a), (3.0, &b), (4.0, &b)]
            .into_iter()
            .map(|(v, t)| s.submit(job(&m, t, v, Default::default())))
            .collect();
        assert_eq!(y(&first.await.unwrap()), 2.0);
        let mut got = Vec::new();
        for r in rest {
            got.push(y(&r.await.unwrap()));
        }
        assert_eq!(got, vec![4.0, 6.0, 8.0]);
        let passes = m.passes.lock().unwrap().clone();
        assert_eq!(passes.len(), 2, "{passes:?}");
        assert_eq!(passes[1].len(), 3);
        assert_eq!(s.passes(), (2, 4));
        assert!(a.used_seconds() > 0.0 && b.used_seconds() > 0.0, "both tenants are charged");
    }

    #[tokio::test]
    async fn max_batch_and_a_window_shape_the_passes() {
        let s = one_at_a_time();
        let m = Doubler::new(1);
        let t = s.tenant("a");
        // A window far longer than scheduling noise, so that "waited for it" and "started at
        // once" stay apart on a loaded machine.
        let window = Duration::from_millis(300);
        let policy = BatchPolicy { max_batch: 2, max_delay: window };
        let started = Instant::now();
        let jobs: Vec<_> = (0..5).map(|i| s.submit(job(&m, &t, i as f32, policy))).collect();
        for (i, j) in jobs.into_iter().enumerate() {
            assert_eq!(y(&j.await.unwrap()), 2.0 * i as f32);
        }
        let sizes: Vec<usize> = m.passes.lock().unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 2, 1], "max_batch 2; the last waits out its window alone");
        assert!(started.elapsed() >= window, "the lone last job waited for company");
        // Without a window a lone job starts at once (well within half the window it would
        // have waited out).
        let lone = Instant::now();
        s.submit(job(&m, &t, 1.0, BatchPolicy::default())).await.unwrap();
        assert!(lone.elapsed() < window / 2, "{:?}", lone.elapsed());
    }

    #[tokio::test]
    async fn one_callers_bad_input_does_not_fail_the_others() {
        let s = one_at_a_time();
        let m = Doubler::new(20);
        let t = s.tenant("a");
        let first = s.submit(job(&m, &t, 1.0, Default::default()));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let good = s.submit(job(&m, &t, 5.0, Default::default()));
        let bad = s.submit(job(&m, &t, f32::NAN, Default::default()));
        first.await.unwrap();
        assert_eq!(y(&good.await.unwrap()), 10.0);
        let err = bad.await.unwrap_err();
        assert_eq!(crate::nn::code_name(err.code), "invalid-argument");
    }

    #[tokio::test]
    async fn the_fairest_tenant_goes_first_and_weights_share() {
        let s = one_at_a_time();
        let m = Doubler::new(5);
        let (a, b) = (s.tenant("flood"), s.tenant("quiet"));
        let no_batch = BatchPolicy { max_batch: 1, ..Default::default() };
        // The flood queues 20 jobs; the quiet tenant's one job arrives last but runs within
        // the next couple of passes, not after the flood.
        let flood: Vec<_> = (0..20).map(|i| s.submit(job(&m, &a, i as f32, no_batch))).collect();
        tokio::time::sleep(Duration::from_millis(12)).await;
        let quiet = s.submit(job(&m, &b, 100.0, no_batch));
        quiet.await.unwrap();
        let order: Vec<f32> = m.passes.lock().unwrap().iter().map(|p| p[0]).collect();
        let at = order.iter().position(|&v| v == 100.0).unwrap();
        assert!(at <= 4, "the quiet tenant ran as pass {at} of {order:?}");
        for f in flood {
            f.await.unwrap();
        }

        // Weight 3 against 1, both always queued: passes split about 3:1.
        let s = one_at_a_time();
        let m = Doubler::new(2);
        let (heavy, light) = (s.tenant("heavy"), s.tenant("light"));
        heavy.configure(3.0, None);
        let mut all = Vec::new();
        for i in 0..60 {
            all.push(s.submit(job(&m, &heavy, 1000.0 + i as f32, no_batch)));
            all.push(s.submit(job(&m, &light, i as f32, no_batch)));
        }
        // Count who got the first 40 passes.
        while m.passes.lock().unwrap().len() < 40 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first: Vec<f32> = m.passes.lock().unwrap().iter().take(40).map(|p| p[0]).collect();
        let heavy_share = first.iter().filter(|&&v| v >= 1000.0).count();
        assert!((26..=34).contains(&heavy_share), "heavy got {heavy_share} of 40 passes");
        drop(all);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_side_by_side_are_each_charged_their_share_of_the_cores() {
        if rayon::current_num_threads() < 2 {
            eprintln!("one compute thread: passes cannot run side by side here");
            return;
        }
        let s = Scheduler::new(Settings { max_running: 2, memory: 1 << 30, spin: true });
        let m = Doubler::new(60);
        let tenants = [s.tenant("a"), s.tenant("b"), s.tenant("c")];
        let no_batch = BatchPolicy { max_batch: 1, ..Default::default() };
        // `a` and `b` run at once (two passes), then `c` alone.
        let (ra, rb) = (s.submit(job(&m, &tenants[0], 1.0, no_batch)), s.submit(job(&m, &tenants[1], 2.0, no_batch)));
        let (ra, rb) = tokio::join!(ra, rb);
        ra.unwrap();
        rb.unwrap();
        s.submit(job(&m, &tenants[2], 3.0, no_batch)).await.unwrap();
        // What each pass should pay: every moment of its span split equally among the passes
        // running then (from the model's own log of the spans, so a loaded machine that
        // stretches them changes nothing).
        let spans = m.spans.lock().unwrap().clone();
        let cores = cores() as f64;
        let mut edges: Vec<Instant> = spans.iter().flat_map(|&(_, b, e)| [b, e]).collect();
        edges.sort();
        for &(v, began, ended) in &spans {
            let want: f64 = edges
                .windows(2)
                .filter(|w| began <= w[0] && w[1] <= ended)
                .map(|w| {
                    let running = spans.iter().filter(|&&(_, b, e)| b <= w[0] && w[1] <= e).count();
                    (w[1] - w[0]).as_secs_f64() * cores / running as f64
                })
                .sum();
            let tenant = &tenants[v as usize - 1];
            let got = tenant.used_seconds();
            assert!(
                (got - want).abs() <= 0.1 * want + 0.003,
                "{}: charged {got} core-s for a share of {want} (spans {spans:?})",
                tenant.name()
            );
        }
        let (a, b, c) = (tenants[0].used_seconds(), tenants[1].used_seconds(), tenants[2].used_seconds());
        // Charged by the pass's share at its launch, the first of the two (launched alone)
        // paid as much as a pass alone. Where a loaded machine started the second pass only
        // as the first ended, each did run alone, and the check above is the whole test.
        let span = |v: f32| spans.iter().find(|s| s.0 == v).map(|&(_, b, e)| (b, e));
        if let (Some((b1, e1)), Some((b2, e2))) = (span(1.0), span(2.0)) {
            let both = e1.min(e2).saturating_duration_since(b1.max(b2));
            if both >= (e1 - b1).max(e2 - b2).mul_f64(0.8) {
                assert!(a < 0.75 * c && b < 0.75 * c, "side by side: {a} and {b}; alone: {c}");
            }
        }
    }

    #[tokio::test]
    async fn a_tenant_ahead_of_its_share_does_not_ride_in_the_quiet_tenants_pass() {
        let s = one_at_a_time();
        let m = Doubler::new(40);
        let (flood, quiet) = (s.tenant("flood"), s.tenant("quiet"));
        let policy = BatchPolicy::default();
        let mut all = vec![s.submit(job(&m, &flood, 0.0, policy))];
        // Six more queue behind the first pass and share the second: the flood is then six
        // rows' worth of compute ahead when the quiet tenant's one job arrives.
        m.started(1).await;
        all.extend((1..7).map(|i| s.submit(job(&m, &flood, i as f32, policy))));
        m.started(2).await;
        all.extend((7..10).map(|i| s.submit(job(&m, &flood, i as f32, policy))));
        let q = s.submit(job(&m, &quiet, 100.0, policy));
        assert_eq!(y(&q.await.unwrap()), 200.0);
        for j in all {
            j.await.unwrap();
        }
        let passes = m.passes.lock().unwrap().clone();
        let sizes: Vec<usize> = passes.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, 6, 1, 3], "{passes:?}");
        assert_eq!(passes[2], vec![100.0], "the quiet tenant's pass carries only its row");
    }

    #[tokio::test]
    async fn a_tenant_behind_its_share_gets_a_priority_pass_and_the_running_one_steps_aside() {
        let s = one_at_a_time();
        let m = Doubler::new(100);
        let (flood, quiet) = (s.tenant("flood"), s.tenant("quiet"));
        let policy = BatchPolicy::default();
        // One pass teaches the scheduler what a row costs; three rows queue meanwhile and
        // make the flood's second pass, which takes every slot (max_running is 1).
        let first = s.submit(job(&m, &flood, 0.0, policy));
        m.started(1).await;
        let rows: Vec<_> = (1..4).map(|i| s.submit(job(&m, &flood, i as f32, policy))).collect();
        first.await.unwrap();
        m.started(2).await;
        // The quiet tenant, behind the flood's share, does not wait for that pass to end: its
        // pass is let in and the flood's steps aside at its next checkpoint (1 ms). The
        // flood's next job, queued first, rides in neither.
        let later = s.submit(job(&m, &flood, 4.0, policy));
        let q = tokio::spawn(s.submit(job(&m, &quiet, 100.0, policy)));
        let f = tokio::spawn(async move {
            for r in rows {
                r.await.unwrap();
            }
        });
        let (q_done, f_done) = tokio::join!(
            async {
                q.await.unwrap().unwrap();
                Instant::now()
            },
            async {
                f.await.unwrap();
                Instant::now()
            }
        );
        assert!(q_done < f_done, "the quiet tenant's answer came first");
        later.await.unwrap();
        let passes = m.passes.lock().unwrap().clone();
        assert_eq!(passes[2], vec![100.0], "the priority pass carries only the quiet row: {passes:?}");
        assert_eq!(passes.len(), 4, "{passes:?}");
        // The flood is charged its three passes' compute, not the time it stood aside. Its
        // passes' wall time includes the quiet pass: charged for that too, it would pay about
        // one quiet pass more. Measured against the passes' own spans (sleeps overshoot on a
        // loaded machine, so a fixed ratio of three to one drifts).
        let (f, q) = (flood.used_seconds(), quiet.used_seconds());
        let spans = m.spans.lock().unwrap().clone();
        let wall = |quiet_one: bool| -> f64 {
            let of = spans.iter().filter(|(x, ..)| (*x == 100.0) == quiet_one);
            of.map(|(_, a, b)| b.duration_since(*a).as_secs_f64()).sum()
        };
        let (fw, qw) = (wall(false), wall(true));
        let rate = q / qw;
        assert!(
            q > 0.0 && f < (fw - qw / 2.0) * rate,
            "flood {f} core-s for passes of {fw} s (the quiet one's {qw} s within), quiet {q}"
        );
    }

    #[tokio::test]
    async fn abandoned_jobs_never_run_queued_and_are_charged_when_running() {
        let s = one_at_a_time();
        // A second-long pass, so that "stopped at its next checkpoint" (milliseconds) and "ran
        // to its end" stay apart on a loaded machine.
        let m = Doubler::new(1000);
        let t = s.tenant("dropper");
        let running = s.submit(job(&m, &t, 1.0, BatchPolicy { max_batch: 1, ..Default::default() }));
        let running = tokio::spawn(running);
        // Abandon it only once its pass has run for a while (on a loaded machine the pass may
        // start well after the submit), so that there is work to charge.
        while s.passes().0 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = s.submit(job(&m, &t, 2.0, BatchPolicy { max_batch: 1, ..Default::default() }));
        drop(queued);
        running.abort();
        // The running pass stops at its next checkpoint, and the slot comes back.
        let next = Instant::now();
        let ok = s.submit(job(&Doubler::new(1), &s.tenant("other"), 3.0, Default::default())).await.unwrap();
        assert_eq!(y(&ok), 6.0);
        assert!(next.elapsed() < Duration::from_millis(500), "the abandoned pass stopped: {:?}", next.elapsed());
        let ran: Vec<f32> = m.passes.lock().unwrap().iter().map(|p| p[0]).collect();
        assert_eq!(ran, vec![1.0], "the dropped queued job never ran");
        assert!(t.used_seconds() > 0.01, "abandoned work is charged: {}", t.used_seconds());
    }

    #[tokio::test]
    async fn a_job_over_the_memory_budget_is_refused_and_passes_fit_what_is_left() {
        let s = Scheduler::new(Settings { max_running: 4, memory: 3, spin: true });
        let m = Doubler::new(20);
        let t = s.tenant("a");
        let mut big = job(&m, &t, 1.0, Default::default());
        big.inputs = vec![(
            "x".into(),
            HostTensor::new(vec![4, 1], TensorType::Fp32, [1f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect())
                .unwrap(),
        )];
        let err = s.submit(big).await.unwrap_err();
        assert_eq!(crate::nn::code_name(err.code), "too-large");
        assert!(err.message.contains("in-flight budget"), "{err}");
        // Five one-row jobs under a 3-byte budget (1 byte per row): never more than 3 rows in
        // flight at once, though four passes could run.
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs: Vec<_> = (0..5)
            .map(|i| s.submit(job(&m, &t, i as f32, BatchPolicy { max_batch: 1, ..Default::default() })))
            .collect();
        let watcher = {
            let (s, peak) = (s.clone(), peak.clone());
            tokio::spawn(async move {
                for _ in 0..100 {
                    let memory = s.handle.shared.state.lock().unwrap().memory;
                    peak.fetch_max(memory as usize, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        for j in jobs {
            j.await.unwrap();
        }
        watcher.await.unwrap();
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }
}
