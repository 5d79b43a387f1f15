//! The bounded compute pool: model forward passes run on blocking threads, at most
//! `concurrency` at once, so a long inference never stalls the async executor that runs
//! plugins, and the host never oversubscribes its cores.

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::error::NnError;

/// Runs blocking compute with bounded concurrency. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ComputePool {
    permits: Arc<Semaphore>,
    concurrency: usize,
}

impl ComputePool {
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

    /// Runs `job` on a blocking thread once a slot is free. Dropping the returned future
    /// stops waiting (a job already running finishes, and only then frees its slot). A panic
    /// in the job becomes a `runtime-error`, never a crashed host.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> Result<T, NnError> + Send + 'static,
    ) -> Result<T, NnError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| NnError::runtime("the compute pool is shut down"))?;
        let task = tokio::task::spawn_blocking(move || {
            let _slot = permit;
            job()
        });
        match task.await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn panics_become_errors() {
        let pool = ComputePool::new(1);
        let err = pool.run::<()>(|| panic!("kaboom")).await.unwrap_err();
        assert!(err.message.contains("kaboom"), "{err}");
        assert_eq!(pool.run(|| Ok(7)).await.unwrap(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrency_is_bounded() {
        let pool = ComputePool::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs = (0..8).map(|_| {
            let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                pool.run(move || {
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
}
