//! Choosing among equivalent ways to run an operator by timing them on the shapes it meets.
//!
//! How a fused convolution block shares its rows among threads depends on the plane's size,
//! the channel count, the caches and the cores together, in ways no one rule captures: on
//! EfficientNet at batch 1, one range of rows per thread wins on a 14x14 plane and loses on a
//! 7x7 one. Where every candidate computes the same numbers, an operator can instead time
//! each a few times on the first passes of each input shape and keep the fastest (as
//! PyTorch's `cudnn.benchmark` mode times cuDNN's algorithms per shape), so a choice is never
//! clearly worse than the measured alternatives.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Timed runs of each candidate before a choice: the fastest of them counts, so one run
/// slowed by another process does not decide. With 3, EfficientNet's blocks whose splits run
/// within a few percent of each other were chosen differently from one process to the next,
/// and the first block sometimes not fused at all (three runs' choices compared). With 8 the
/// batch-1 pass ran 2.255 against 2.298 ms (medians of eight alternating runs, seven of the
/// eight pairs faster), for 72 timed passes at most per shape instead of 27.
const SAMPLES: u32 = 8;

/// How much faster than the default (the first candidate) another must run to be chosen: a
/// candidate's time leaves out what it costs the operators after it (one that writes a
/// larger tensor out evicts what they read), and on a busy machine runs vary by a few
/// percent (EfficientNet at batch 8, where the splits differ by 2–5%, ran up to 10% slower
/// without a margin; at batch 1 the splits chosen win by 15–35%).
const MARGIN: f64 = 0.1;

/// Input shapes tuned per operator; beyond them, the first candidate runs untimed (a graph
/// fed ever-new shapes must not grow this without bound).
pub(super) const SHAPES: usize = 16;

/// Per input shape, which of an operator's candidates (equivalent ways to run it, the
/// default one first) runs fastest, found by timing each [`SAMPLES`] times.
pub(super) struct Tuner<C> {
    shapes: Mutex<Vec<Shape<C>>>,
}

/// What a [`Tuner`] knows of one input shape.
struct Shape<C> {
    key: Vec<usize>,
    candidates: Vec<C>,
    runs: Vec<Runs>,
    chosen: Option<usize>,
}

/// One candidate's timed runs.
#[derive(Clone, Copy)]
struct Runs {
    count: u32,
    best: Duration,
    /// A run failed: the candidate is not run again, nor chosen.
    rejected: bool,
}

/// A run to time: the shape and the candidate it ran ([`Tuner::record`] takes it back).
#[derive(Debug)]
pub(super) struct Ticket {
    key: Vec<usize>,
    index: usize,
}

impl<C> Default for Tuner<C> {
    fn default() -> Self {
        Tuner { shapes: Mutex::new(Vec::new()) }
    }
}

impl<C: Clone + std::fmt::Debug> Tuner<C> {
    /// The candidate to run on the shape `key`: the chosen one once tuned; before that, the
    /// one timed least often, with a [`Ticket`] for [`Tuner::record`]. `candidates` (the
    /// default first) is called for a shape not seen yet; `None` if it returns none.
    pub(super) fn pick(&self, key: &[usize], candidates: impl FnOnce() -> Vec<C>) -> Option<(C, Option<Ticket>)> {
        // A poisoned lock only means a panic elsewhere between whole updates.
        let mut shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        let at = match shapes.iter().position(|s| s.key == key) {
            Some(at) => at,
            None => {
                let candidates = candidates();
                if candidates.len() <= 1 || shapes.len() >= SHAPES {
                    return candidates.into_iter().next().map(|c| (c, None));
                }
                let runs = vec![Runs { count: 0, best: Duration::MAX, rejected: false }; candidates.len()];
                shapes.push(Shape { key: key.to_vec(), candidates, runs, chosen: None });
                shapes.len() - 1
            }
        };
        let shape = &shapes[at];
        if let Some(chosen) = shape.chosen {
            return shape.candidates.get(chosen).map(|c| (c.clone(), None));
        }
        let (index, _) = shape.runs.iter().enumerate().filter(|(_, r)| !r.rejected).min_by_key(|(_, r)| r.count)?;
        let ticket = Ticket { key: key.to_vec(), index };
        shape.candidates.get(index).map(|c| (c.clone(), Some(ticket)))
    }

    /// Rules out the candidate of `ticket` (its run failed): it is not run again, nor chosen.
    pub(super) fn reject(&self, ticket: Ticket) {
        let mut shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(shape) = shapes.iter_mut().find(|s| s.key == ticket.key) else { return };
        if let Some(runs) = shape.runs.get_mut(ticket.index) {
            runs.rejected = true;
        }
        Self::choose(shape);
    }

    /// Records how long the run of `ticket` took; once every candidate of its shape has run
    /// [`SAMPLES`] times, the fastest (by its fastest run) is chosen for good.
    pub(super) fn record(&self, ticket: Ticket, took: Duration) {
        let mut shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(shape) = shapes.iter_mut().find(|s| s.key == ticket.key) else { return };
        let Some(runs) = shape.runs.get_mut(ticket.index) else { return };
        // A rejected candidate stays so, whatever a concurrent run of it reports.
        if runs.rejected {
            return;
        }
        runs.count += 1;
        runs.best = runs.best.min(took);
        Self::choose(shape);
    }

    /// Chooses for `shape` once every candidate has run [`SAMPLES`] times.
    fn choose(shape: &mut Shape<C>) {
        if shape.chosen.is_none() && shape.runs.iter().all(|r| r.rejected || r.count >= SAMPLES) {
            let live = shape.runs.iter().enumerate().filter(|(_, r)| !r.rejected);
            let fastest = live.min_by_key(|(_, r)| r.best).map(|(i, _)| i);
            // The default keeps its place unless another candidate beats it by MARGIN.
            let default = shape.runs.first().filter(|r| !r.rejected).map(|r| r.best.as_secs_f64());
            let chosen = match (fastest, default) {
                (Some(i), Some(d)) if d > shape.runs[i].best.as_secs_f64() * (1.0 + MARGIN) => Some(i),
                (Some(_), Some(_)) => Some(0),
                _ => fastest,
            };
            shape.chosen = chosen;
            tracing::debug!(
                shape = ?shape.key,
                chosen = ?chosen.and_then(|i| shape.candidates.get(i)),
                timed = ?shape.candidates.iter().zip(&shape.runs).map(|(c, r)| (c, r.best)).collect::<Vec<_>>(),
                "tuned"
            );
        }
    }

    /// The candidate chosen for `key`, once tuned.
    #[cfg(test)]
    pub(super) fn chosen(&self, key: &[usize]) -> Option<C> {
        let shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        let shape = shapes.iter().find(|s| s.key == key)?;
        shape.chosen.and_then(|i| shape.candidates.get(i).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each candidate is timed SAMPLES times, in turn, then the fastest (by its best run, and
    /// by more than MARGIN where it is not the default) runs untimed from then on; a lone
    /// candidate and shapes past the cap run the default.
    #[test]
    fn times_each_candidate_then_keeps_the_fastest() {
        let tuner = Tuner::<char>::default();
        // Milliseconds of run `run` of each candidate.
        let cost = |c: char, run: usize| match c {
            'a' => 5,
            'b' if run == 1 => 2, // fastest once: its best run counts
            'b' => 9,
            _ => 4,
        };
        let mut seen = Vec::new();
        for _ in 0..3 * SAMPLES {
            let (c, ticket) = tuner.pick(&[1, 2], || vec!['a', 'b', 'c']).unwrap();
            let ticket = ticket.expect("still tuning");
            let run = seen.iter().filter(|&&s| s == c).count();
            seen.push(c);
            tuner.record(ticket, Duration::from_millis(cost(c, run)));
        }
        for c in ['a', 'b', 'c'] {
            assert_eq!(seen.iter().filter(|&&s| s == c).count(), SAMPLES as usize, "{seen:?}");
        }
        assert_eq!(tuner.chosen(&[1, 2]), Some('b'));
        let (c, ticket) = tuner.pick(&[1, 2], || unreachable!("known shape")).unwrap();
        assert_eq!((c, ticket.is_none()), ('b', true));
        // A candidate within MARGIN of the default does not displace it.
        for _ in 0..2 * SAMPLES {
            let (c, ticket) = tuner.pick(&[7], || vec!['a', 'b']).unwrap();
            tuner.record(ticket.unwrap(), Duration::from_micros(if c == 'a' { 1050 } else { 1000 }));
        }
        assert_eq!(tuner.chosen(&[7]), Some('a'));
        // A candidate whose run failed is not run again, nor chosen.
        let (c, ticket) = tuner.pick(&[8], || vec!['a', 'b']).unwrap();
        assert_eq!(c, 'a');
        tuner.reject(ticket.unwrap());
        for _ in 0..SAMPLES {
            let (c, ticket) = tuner.pick(&[8], || unreachable!()).unwrap();
            assert_eq!(c, 'b');
            tuner.record(ticket.unwrap(), Duration::from_millis(9));
        }
        assert_eq!(tuner.chosen(&[8]), Some('b'));
        // A run of a rejected candidate that ends after the rejection does not bring it back.
        let (c, first) = tuner.pick(&[9], || vec!['a', 'b']).unwrap();
        let (_, second) = tuner.pick(&[9], || unreachable!()).unwrap();
        assert_eq!(c, 'a');
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(first.index, second.index);
        tuner.reject(first);
        tuner.record(second, Duration::from_nanos(1));
        for _ in 0..SAMPLES {
            let (c, ticket) = tuner.pick(&[9], || unreachable!()).unwrap();
            assert_eq!(c, 'b');
            tuner.record(ticket.unwrap(), Duration::from_millis(9));
        }
        assert_eq!(tuner.chosen(&[9]), Some('b'));
        // Another shape starts over; a lone candidate is not timed.
        assert!(tuner.pick(&[3], || vec!['a', 'b']).unwrap().1.is_some());
        assert!(tuner.pick(&[4], || vec!['c']).unwrap().1.is_none());
        assert!(tuner.pick(&[5], Vec::new).is_none());
        // Past the cap, new shapes run the default untimed.
        for k in 0..2 * SHAPES {
            let (c, ticket) = tuner.pick(&[100 + k], || vec!['c', 'a']).unwrap();
            if ticket.is_none() {
                assert_eq!(c, 'c');
            }
        }
        assert!(tuner.shapes.lock().unwrap().len() <= SHAPES);
    }
}
