//! Blocking work that is not a forward pass (model loads): on blocking threads, at most
//! `concurrency` at once, so a long load never stalls the async executor that runs plugins.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::nn::NnError;
use crate::nn::meter::CancelToken;

/// Runs blocking compute with bounded concurrency. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BlockingPool {
    permits: Arc<Semaphore>,
    concurrency: usize,
}

impl BlockingPool {
    /// A pool running at most `concurrency` jobs at once (at least one).
    pub fn new(concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self { permits: Arc::new(Semaphore::new(concurrency)), concurrency }
    }

    /// A pool sized to the machine's cores.
    pub fn for_this_machine() -> Self {
        Self::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    /// How many jobs may run at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Runs `job` on a blocking thread once a slot is free. A panic in the job becomes a
    /// `runtime-error`, never a crashed host.
    ///
    /// Dropping the returned future (the caller timed out or went away) cancels `token`: a job
    /// still queued then never starts, and a running one stops at its next checkpoint (see
    /// [`Meter::checkpoint`](crate::nn::Meter::checkpoint)), which frees its slot.
    pub fn run<T: Send + 'static>(
        &self,
        token: &CancelToken,
        job: impl FnOnce() -> Result<T, NnError> + Send + 'static,
    ) -> impl Future<Output = Result<T, NnError>> + Send + 'static {
        // Armed now, not at the first poll: a future dropped unpolled cancels too.
        let guard = token.cancel_on_drop();
        let (permits, token) = (self.permits.clone(), token.clone());
        async move {
            let permit =
                permits.acquire_owned().await.map_err(|_| NnError::runtime("the compute pool is shut down"))?;
            let task = tokio::task::spawn_blocking(move || {
                let _slot = permit;
                if token.is_cancelled() {
                    return Err(NnError::timeout("the caller stopped waiting before the job started"));
                }
                job()
            });
            let result = task.await;
            guard.disarm();
            match result {
                Ok(result) => result,
                Err(e) if e.is_panic() => {
                    let what = e.into_panic();
                    let message = what
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| what.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(%message, "a backend panicked; the request failed, the host carries on");
                    Err(NnError::runtime(format!("the backend failed unexpectedly: {message}")))
                }
                Err(_) => Err(NnError::runtime("the compute job was cancelled")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn panics_become_errors() {
        let pool = BlockingPool::new(1);
        let err = pool.run::<()>(&CancelToken::new(), || panic!("kaboom")).await.unwrap_err();
        assert!(err.message.contains("kaboom"), "{err}");
        assert_eq!(pool.run(&CancelToken::new(), || Ok(7)).await.unwrap(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrency_is_bounded() {
        let pool = BlockingPool::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs = (0..8).map(|_| {
            let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                pool.run(&CancelToken::new(), move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
            })
        });
        for job in jobs.collect::<Vec<_>>() {
            job.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_wait_cancels_queued_and_running_jobs() {
        let pool = BlockingPool::new(1);
        let ran = Arc::new(AtomicUsize::new(0));
        let running = CancelToken::new();
        let seen = running.clone();
        let r = ran.clone();
        // A job that runs until it is cancelled, as a forward pass between its checkpoints.
        let first = pool.run(&running, move || {
            r.fetch_add(1, Ordering::SeqCst);
            while !seen.is_cancelled() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(())
        });
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), first).await.is_err());
        assert!(running.is_cancelled(), "the timed-out wait cancelled its job");
        // The slot comes back once the job saw the cancellation.
        let queued = CancelToken::new();
        let r = ran.clone();
        drop(pool.run(&queued, move || {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }));
        assert!(queued.is_cancelled());
        assert_eq!(pool.run(&CancelToken::new(), || Ok(5)).await.unwrap(), 5);
        assert_eq!(ran.load(Ordering::SeqCst), 1, "the dropped job never ran");
    }
}
