//! Parallel loops whose calling thread spins, rather than sleeps, while its helpers finish.
//!
//! A forward pass is a chain of short parallel sections (EfficientNet-Lite0 at batch 1: about
//! 60 in 5 ms on two threads). In a rayon `join` or parallel iterator, a thread whose share is
//! done and whose other half was stolen waits on a latch: it yields about 32 times and then
//! sleeps on a futex until the thief wakes it. On a virtual machine a woken vCPU takes tens of
//! microseconds to run again, and the thief pays the `futex` call: with rayon changed to never
//! sleep, an EfficientNet batch-1 pass on 2 threads took 4.8–5.2 ms against 5.3–6.0 ms (`bench
//! onnx`, three alternating runs each). [`crate::scheduler::Awake`] keeps the *other* threads
//! from sleeping between sections; this keeps the pass's own thread from sleeping inside one.
//!
//! [`for_each_init`] hands the items out from a shared iterator, one or a few at a time, to
//! the calling thread, which takes them from the front, and to as many helper jobs as the pool
//! has other threads, which take them from the back: with two threads each works through a
//! contiguous half of the items (neighbouring units share operands; taken alternately, both
//! cores read them). When none is left, the caller runs other pool work (`rayon::yield_now`,
//! which also runs a helper no thread has taken) and otherwise spins until every helper has
//! returned; once it has waited [`SPIN_LIMIT`] and finds nothing to run (a helper's thread
//! descheduled, or busy with a long item) it leaves the wait to rayon, which sleeps. Items run in any order on
//! any thread, so each must write only its own part of the output.
//!
//! For passes, which run on a pool thread. The LLM engine calls its kernels from its own
//! thread, and there rayon's indexed iterators stay faster: SmolLM2 decode on 2 threads fell
//! from 69–76 to 59–63 tokens/s with its quantized products on this loop (`bench llm`, three
//! alternating runs), and as much with rayon's `par_bridge`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long the calling thread waits for its helpers before, finding nothing else to run, it
/// leaves the wait to rayon: longer than a section's usual imbalance (tens of microseconds),
/// short enough that a helper whose thread the OS has descheduled costs little CPU. (A job it
/// runs meanwhile through `yield_now` is not cut short, as in rayon's own wait.)
pub(crate) const SPIN_LIMIT: Duration = Duration::from_micros(200);

/// Runs `f(state, item)` for every item of `items`, spread over the compute pool. The caller
/// and each helper job make a `state` with `init` before their first item: at most as many
/// states as the pool has threads, and no more than items. `items` must report its exact length
/// (`size_hint`); one that reports less runs with fewer helpers, or on the caller alone.
pub(crate) fn for_each_init<I, T, S>(items: I, init: impl Fn() -> S + Sync, f: impl Fn(&mut S, T) + Sync)
where
    I: IntoIterator<Item = T>,
    I::IntoIter: DoubleEndedIterator + Send,
    T: Send,
{
    let items = items.into_iter();
    let (len, threads) = (items.size_hint().0, rayon::current_num_threads());
    // Helpers beyond the items there are would find nothing to do.
    let helpers = threads.saturating_sub(1).min(len.saturating_sub(1));
    if helpers == 0 {
        let mut state = None;
        for item in items {
            f(state.get_or_insert_with(&init), item);
        }
        return;
    }
    // Items are taken `grain` at a time: about eight takes per thread, so that many small
    // items (a pooling's planes) do not each take the lock, and a few large ones (a GEMM's
    // units) are still shared out one by one.
    let grain = (len / (8 * threads)).max(1);
    let queue = Mutex::new(items.fuse());
    let work = |back: bool| {
        let mut taken = Vec::with_capacity(grain);
        let mut state = None;
        loop {
            // The lock is held only to take items, never while one runs.
            let mut queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
            match back {
                false => taken.extend(queue.by_ref().take(grain)),
                true => taken.extend(queue.by_ref().rev().take(grain)),
            }
            drop(queue);
            if taken.is_empty() {
                return;
            }
            let state = state.get_or_insert_with(&init);
            for item in taken.drain(..) {
                f(state, item);
            }
        }
    };
    let done = AtomicUsize::new(0);
    rayon::scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|_| {
                // Counted on the way out, a panic included (rayon then re-raises it here).
                let _done = Done(&done);
                work(true);
            });
        }
        work(false);
        let start = Instant::now();
        let mut rounds = 0u32;
        while done.load(Ordering::Acquire) < helpers {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => {}
                Some(rayon::Yield::Idle) => {
                    std::hint::spin_loop();
                    // The clock is read every 64 rounds: a round is well under a microsecond.
                    rounds = rounds.wrapping_add(1);
                    if rounds.is_multiple_of(64) && start.elapsed() > SPIN_LIMIT {
                        break;
                    }
                }
                // Not on a pool thread (`scope` runs its body on one): rayon's own wait.
                None => break,
            }
        }
    });
}

/// [`for_each_init`] without per-thread state.
pub(crate) fn for_each<I, T>(items: I, f: impl Fn(T) + Sync)
where
    I: IntoIterator<Item = T>,
    I::IntoIter: DoubleEndedIterator + Send,
    T: Send,
{
    for_each_init(items, || (), |_, item| f(item))
}

/// Counts a helper as finished when dropped.
struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_with_one_state_per_thread() {
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for len in [0usize, 1, 2, 5, 100] {
                let hits: Vec<AtomicUsize> = (0..len).map(|_| AtomicUsize::new(0)).collect();
                let states = AtomicUsize::new(0);
                pool.install(|| {
                    for_each_init(
                        0..len,
                        || states.fetch_add(1, Ordering::Relaxed),
                        |_, i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        },
                    )
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{threads} threads, {len} items");
                assert!(states.load(Ordering::Relaxed) <= threads.min(len));
            }
        }
    }

    #[test]
    fn mutable_items_and_nested_loops() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut out = vec![0u64; 1000];
        pool.install(|| {
            for_each(out.chunks_mut(10).enumerate(), |(i, chunk)| {
                // A loop inside an item, as a fused pass's product runs inside its range.
                let sums: Vec<AtomicUsize> = (0..chunk.len()).map(|_| AtomicUsize::new(0)).collect();
                for_each(0..chunk.len(), |j| {
                    sums[j].store(i * 10 + j, Ordering::Relaxed);
                });
                for (o, s) in chunk.iter_mut().zip(&sums) {
                    *o = s.load(Ordering::Relaxed) as u64;
                }
            })
        });
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as u64));
    }

    #[test]
    fn a_panicking_item_reaches_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| {
                for_each(0..64, |i| {
                    assert!(i != 40, "item 40");
                    std::thread::sleep(Duration::from_micros(50));
                })
            })
        }));
        assert!(caught.is_err());
        // The pool still runs work afterwards.
        assert_eq!(pool.install(|| rayon::join(|| 1, || 2)), (1, 2));
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Not a test: `cargo test -p eir --lib par::timing -- --ignored --nocapture` prints what
    /// a parallel section costs beyond its items' own work, on a pool of two threads kept
    /// awake as the scheduler runs passes (a pass has about 60 of them).
    #[test]
    #[ignore]
    fn section_overhead() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let awake = crate::scheduler::Awake::new(true);
        let sections = 20_000u32;
        for items in [2usize, 8, 32] {
            for _ in 0..3 {
                let t = pool.install(|| {
                    awake.run(|| {
                        let t = Instant::now();
                        for _ in 0..sections {
                            for_each(0..items, |i| {
                                std::hint::black_box(i);
                            });
                        }
                        t.elapsed()
                    })
                });
                eprintln!("{items:>2} empty items: {:.2} µs a section", t.as_secs_f64() * 1e6 / f64::from(sections));
            }
        }
    }
}
