//! Keeps the compute pool's other threads awake while a pass runs alone.
//!
//! A forward pass is a chain of short parallel sections (EfficientNet-Lite0 at batch 1: about
//! 60 in 7 ms; MiniLM on one sentence: 6 layers of a few each). Between two sections rayon lets
//! an idle worker sleep on a futex, and the next section waits for it to wake: on 2 cores that
//! was 8-10% of an EfficientNet pass's samples (`futex`, `sched_yield`), and a one-sentence
//! MiniLM pass took 1.64-1.72 ms with it against 1.31-1.35 ms with the other thread kept
//! spinning. ONNX Runtime spins its pool the same way (`session.intra_op.allow_spinning`).
//!
//! [`Awake::run`] runs a pass with one spinner job per other pool thread: it runs the pass's
//! stolen work (`rayon::yield_now`) and otherwise spins, until the pass ends. It spins only
//! while this pass is the only one running: with two passes on the pool there is no idle
//! thread to keep, and a spinner must never hold a thread another pass needs.
//!
//! A spinner is a pool job, so a thread waiting inside a `join` could run it nested and then
//! could not return to its `join` until the spinner stops. Within one pass that cannot happen:
//! the spinners are pushed onto the pass's own thread's queue before the pass starts, that
//! thread takes its own jobs newest first and the others steal oldest first, so no job of the
//! pass leaves its thread before every spinner has (a spinner that the pass's thread reaches
//! itself returns at once). Work from outside the pass (another scheduler's pass, a model
//! load on the same pool) can still take a spinner into its `join`; that spinner then runs the
//! pass's work and stops once it finds none for [`IDLE_LIMIT`], or the pass ends: the outside
//! `join` waits at most about as long as this pass runs (a stall, never a deadlock: a spinner
//! blocks on nothing). A spinner that finds itself nested in another spinner returns at once,
//! so they do not pile up on one thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a spinner spins without finding work before it stops: longer than the serial
/// stretches between a pass's parallel sections (tens of microseconds), short enough that an
/// idle pool goes back to sleep soon.
pub const IDLE_LIMIT: Duration = Duration::from_micros(500);

/// The passes of one scheduler, as its spinners see them. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Awake {
    /// Whether passes run with spinners at all (`[server] compute_spin`).
    enabled: bool,
    /// Passes inside [`Awake::run`] now.
    running: Arc<AtomicUsize>,
    /// How long a spinner spins without work ([`IDLE_LIMIT`]).
    idle: Duration,
    /// Spinners spinning now.
    spinning: Arc<AtomicUsize>,
    /// Spinners started so far.
    started: Arc<AtomicUsize>,
}

impl Awake {
    /// Spinners for passes run through this value (or none, when not `enabled`).
    pub fn new(enabled: bool) -> Self {
        Self { enabled, running: Arc::default(), idle: IDLE_LIMIT, spinning: Arc::default(), started: Arc::default() }
    }

    /// Runs `pass` (called on a worker of the compute pool, as the scheduler runs passes) with
    /// the pool's other threads kept awake while it is the only pass running.
    pub fn run<R>(&self, pass: impl FnOnce() -> R) -> R {
        let running = Running::enter(&self.running);
        let threads = rayon::current_num_threads();
        // With another pass running there is no idle thread to keep: spawning spinners would
        // only wake threads for them to return.
        let alone = self.running.load(Ordering::Acquire) == 1;
        let Some(own) = rayon::current_thread_index().filter(|_| self.enabled && threads > 1 && alone) else {
            return pass();
        };
        for _ in 1..threads {
            let (stop, me) = (running.stop.clone(), self.clone());
            rayon::spawn(move || me.spin(own, &stop));
        }
        pass()
    }
}

/// One pass counted as running; dropping it (also on a panic) stops its spinners.
struct Running<'a> {
    count: &'a AtomicUsize,
    stop: Arc<AtomicBool>,
}

impl<'a> Running<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self { count, stop: Arc::new(AtomicBool::new(false)) }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Awake {
    /// A spinner: runs whatever work the pool has and spins between, until its pass ends
    /// (`stop`), another pass runs, or it has found nothing to do for `self.idle`. Returns at
    /// once on the pass's own thread (`own`).
    fn spin(&self, own: usize, stop: &AtomicBool) {
        if rayon::current_thread_index() == Some(own) || SPINNING.get() {
            return;
        }
        SPINNING.set(true);
        let _unset = Unset;
        self.started.fetch_add(1, Ordering::AcqRel);
        self.spinning.fetch_add(1, Ordering::AcqRel);
        let _done = Decrement(&self.spinning);
        let mut idle_since = Instant::now();
        let mut rounds = 0u32;
        while !stop.load(Ordering::Acquire) && self.running.load(Ordering::Acquire) <= 1 {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => idle_since = Instant::now(),
                Some(rayon::Yield::Idle) => {
                    std::hint::spin_loop();
                    // The clock is read every 64 rounds: a round is well under a microsecond.
                    rounds = rounds.wrapping_add(1);
                    if rounds.is_multiple_of(64) && idle_since.elapsed() > self.idle {
                        return;
                    }
                }
                None => return,
            }
        }
    }
}

thread_local! {
    /// Whether this thread is running a spinner (one that `yield_now` hands another returns).
    static SPINNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Clears [`SPINNING`] when dropped.
struct Unset;

impl Drop for Unset {
    fn drop(&mut self) {
        SPINNING.set(false);
    }
}

/// Takes one off a count when dropped.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Waits up to 2 s for `count` to read `want`.
    fn settles(count: &AtomicUsize, want: usize) -> bool {
        settles_within(count, want, Duration::from_secs(2))
    }

    fn settles_within(count: &AtomicUsize, want: usize, within: Duration) -> bool {
        let t = Instant::now();
        while count.load(Ordering::Acquire) != want {
            if t.elapsed() > within {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// A pool of its own, so that other tests' work neither feeds nor delays the spinners.
    fn pool() -> rayon::ThreadPool {
        pool_of(2)
    }

    fn pool_of(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool")
    }

    /// An `Awake` whose spinners give up only after `idle`.
    fn patient(idle: Duration) -> Awake {
        Awake { idle, ..Awake::new(true) }
    }

    /// While a pass runs alone the other thread spins, and stops when the pass ends; never
    /// when spinning is off. The pass computes what it computes either way.
    #[test]
    fn a_spinner_runs_with_its_pass_and_stops_after_it() {
        let awake = patient(Duration::from_secs(60));
        let pool = pool();
        let sum = pool.install(|| {
            awake.run(|| {
                let sum = (0..1_000_000u64).into_par_iter().sum::<u64>();
                assert!(settles(&awake.spinning, 1), "no spinner ran beside the pass");
                sum
            })
        });
        assert_eq!(sum, 999_999 * 1_000_000 / 2);
        assert!(settles(&awake.spinning, 0), "a spinner outlived its pass");
        assert!(settles(&awake.running, 0));

        let off = Awake::new(false);
        pool.install(|| off.run(|| std::thread::sleep(Duration::from_millis(100))));
        assert_eq!(off.started.load(Ordering::Acquire), 0);
    }

    /// A spinner that finds no work gives up while its pass still runs.
    #[test]
    fn a_spinner_without_work_gives_up() {
        let awake = Awake::new(true);
        pool().install(|| {
            awake.run(|| {
                assert!(settles_within(&awake.started, 1, Duration::from_secs(2)), "no spinner started");
                assert!(settles(&awake.spinning, 0), "a spinner kept spinning without work");
            })
        });
    }

    /// A second pass stops the first one's spinner (its thread is the second pass's to use).
    #[test]
    fn a_second_pass_stops_the_spinners() {
        let awake = patient(Duration::from_secs(60));
        pool().install(|| {
            awake.run(|| {
                assert!(settles(&awake.spinning, 1));
                let _second = Running::enter(&awake.running);
                assert!(settles(&awake.spinning, 0), "a spinner kept spinning beside a second pass");
            })
        });
    }

    /// Many passes side by side on 2 and on 4 threads, each with spinners, nested in each
    /// other's joins as the pool pleases: all finish, long before a spinner would give up for
    /// want of work (so none held a thread another pass waited for).
    #[test]
    fn passes_side_by_side_all_finish() {
        for threads in [2, 4] {
            let awake = patient(Duration::from_secs(60));
            let t = Instant::now();
            side_by_side(&awake, &pool_of(threads));
            assert!(t.elapsed() < Duration::from_secs(20), "{threads} threads: {:?}", t.elapsed());
        }
    }

    fn side_by_side(awake: &Awake, pool: &rayon::ThreadPool) {
        let total: u64 = pool.install(|| {
            (0..64u64)
                .into_par_iter()
                .map(|i| awake.run(|| (0..10_000u64).into_par_iter().map(|x| x % (i + 1)).sum::<u64>()))
                .sum()
        });
        let want: u64 = (0..64u64).map(|i| (0..10_000u64).map(|x| x % (i + 1)).sum::<u64>()).sum();
        assert_eq!(total, want);
        assert!(settles(&awake.running, 0) && settles(&awake.spinning, 0));
    }

    /// A pass that panics still stops its spinners and leaves the count right.
    #[test]
    fn a_panicking_pass_stops_its_spinners() {
        let awake = Awake::new(true);
        let caught =
            pool().install(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| awake.run(|| panic!("boom")))));
        assert!(caught.is_err());
        assert!(settles(&awake.running, 0) && settles(&awake.spinning, 0));
    }
}
