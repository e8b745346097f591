//! The agent's background work, supervised. Every task and thread has a
//! name; one that ends before shutdown (an error, a panic, or simply
//! returning when it should run for the agent's life) is seen at once,
//! logged and counted in `kloak_task_failures_total{task,how}`. Shutdown is
//! one signal every task can wait on, then a drain that waits for them,
//! within a deadline, and names those that did not finish.
//!
//! Readiness is a set of named holds: anything that must happen before the
//! agent serves takes a [`BlockReady`] and drops it when done; `/readyz`
//! says ready once no hold is left, and lists those still held.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: &'static str,
    /// `error`, `panic` or `ended` (returned while the agent still ran).
    pub how: &'static str,
}

#[derive(Debug, Default)]
pub struct TaskMetrics {
    pub failures: Family<TaskLabels, Counter>,
}

impl TaskMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "kloak_task_failures",
            "Background tasks that ended before shutdown, by task and how",
            self.failures.clone(),
        );
    }
}

/// The shutdown signal, as tasks see it.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    pub fn is_set(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has begun.
    pub async fn wait(mut self) {
        let _ = self.rx.wait_for(|s| *s).await;
    }
}

/// How a task ended.
enum End {
    Ok,
    Error(String),
    Panic,
}

struct Inner {
    shutdown_tx: watch::Sender<bool>,
    metrics: Arc<TaskMetrics>,
    /// Receivers that close when their task ends, for the drain.
    running: Mutex<Vec<(&'static str, std::sync::mpsc::Receiver<()>)>>,
}

#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks::new()
    }
}

impl Tasks {
    pub fn new() -> Self {
        Tasks::with_metrics(Arc::default())
    }

    /// Counts failures into `metrics` (the admin port's).
    pub fn with_metrics(metrics: Arc<TaskMetrics>) -> Self {
        let (shutdown_tx, _) = watch::channel(false);
        Tasks {
            inner: Arc::new(Inner {
                shutdown_tx,
                metrics,
                running: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn metrics(&self) -> Arc<TaskMetrics> {
        self.inner.metrics.clone()
    }

    pub fn shutdown(&self) -> Shutdown {
        Shutdown {
            rx: self.inner.shutdown_tx.subscribe(),
        }
    }

    fn register(&self, name: &'static str) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner
            .running
            .lock()
            .expect("not poisoned")
            .push((name, rx));
        tx
    }

    /// Counts and logs a task that ended; an end during shutdown is the
    /// drain doing its work.
    fn ended(&self, name: &'static str, end: End) {
        let stopping = *self.inner.shutdown_tx.borrow();
        let how = match (&end, stopping) {
            (End::Ok, true) | (End::Error(_), true) => {
                tracing::debug!(task = name, "task finished");
                return;
            }
            (End::Ok, false) => {
                tracing::error!(task = name, "background task ended while the agent runs");
                "ended"
            }
            (End::Error(e), false) => {
                tracing::error!(task = name, error = %e, "background task failed");
                "error"
            }
            (End::Panic, _) => {
                tracing::error!(task = name, "background task panicked");
                "panic"
            }
        };
        self.inner
            .metrics
            .failures
            .get_or_create(&TaskLabels { task: name, how })
            .inc();
    }

    /// Runs `f` on the tokio runtime. It gets the shutdown signal; when it
    /// does not finish by itself after shutdown, the drain cancels it.
    pub fn spawn<F, E>(&self, name: &'static str, f: impl FnOnce(Shutdown) -> F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let done = self.register(name);
        let shutdown = self.shutdown();
        let fut = f(shutdown.clone());
        let inner = tokio::spawn(async move {
            tokio::select! {
                r = fut => r.map_err(|e| e.to_string()),
                () = shutdown.wait() => Ok(()),
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            let end = match inner.await {
                Ok(Ok(())) => End::Ok,
                Ok(Err(e)) => End::Error(e),
                Err(_) => End::Panic,
            };
            me.ended(name, end);
            drop(done);
        });
    }

    /// Runs `f` on a thread of its own (named `kloak-<name>`) for the
    /// agent's life. It must return once the shutdown signal is set.
    pub fn spawn_thread<E: std::fmt::Display>(
        &self,
        name: &'static str,
        f: impl FnOnce(Shutdown) -> Result<(), E> + Send + 'static,
    ) -> std::io::Result<()> {
        self.thread(name, false, f)
    }

    /// Runs `f` on a thread of its own until its inputs close (a channel
    /// whose senders are all gone): returning is its normal end, at any
    /// time; only an error or a panic is a failure. The drain waits for it.
    pub fn spawn_worker<E: std::fmt::Display>(
        &self,
        name: &'static str,
        f: impl FnOnce(Shutdown) -> Result<(), E> + Send + 'static,
    ) -> std::io::Result<()> {
        self.thread(name, true, f)
    }

    fn thread<E: std::fmt::Display>(
        &self,
        name: &'static str,
        may_end: bool,
        f: impl FnOnce(Shutdown) -> Result<(), E> + Send + 'static,
    ) -> std::io::Result<()> {
        let done = self.register(name);
        let shutdown = self.shutdown();
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("kloak-{name}"))
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(shutdown)));
                let end = match r {
                    Ok(Ok(())) if may_end => {
                        tracing::debug!(task = name, "worker finished: its inputs closed");
                        drop(done);
                        return;
                    }
                    Ok(Ok(())) => End::Ok,
                    Ok(Err(e)) => End::Error(e.to_string()),
                    Err(_) => End::Panic,
                };
                me.ended(name, end);
                drop(done);
            })?;
        Ok(())
    }

    /// Follows work this crate does not start (another crate's thread):
    /// `alive` is asked every second until shutdown.
    pub fn watch(&self, name: &'static str, alive: impl Fn() -> bool + Send + 'static) {
        self.spawn(name, move |shutdown| async move {
            loop {
                if shutdown.is_set() {
                    return Ok::<(), String>(());
                }
                if !alive() {
                    return Err("stopped".to_string());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Sets the shutdown signal and waits, at most `deadline` in all, for
    /// every task to end. Returns the names of those still running.
    pub fn drain(&self, deadline: Duration) -> Vec<&'static str> {
        self.inner.shutdown_tx.send_replace(true);
        let until = std::time::Instant::now() + deadline;
        let running = std::mem::take(&mut *self.inner.running.lock().expect("not poisoned"));
        let mut late = Vec::new();
        for (name, rx) in running {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(left) {
                late.push(name);
            }
        }
        if !late.is_empty() {
            tracing::warn!(tasks = ?late, "background tasks still running at the end of the drain");
        }
        late
    }
}

/// Named holds on readiness.
#[derive(Clone, Default, Debug)]
pub struct Ready {
    holds: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    next: Arc<AtomicU64>,
}

impl Ready {
    /// Not ready until the returned hold is dropped (or released).
    pub fn block(&self, name: &'static str) -> BlockReady {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.holds.lock().expect("not poisoned").insert(id, name);
        BlockReady {
            ready: self.clone(),
            id,
            released: AtomicBool::new(false),
        }
    }

    /// What readiness still waits for, in the order the holds were taken.
    pub fn pending(&self) -> Vec<&'static str> {
        self.holds
            .lock()
            .expect("not poisoned")
            .values()
            .copied()
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.holds.lock().expect("not poisoned").is_empty()
    }
}

#[derive(Debug)]
pub struct BlockReady {
    ready: Ready,
    id: u64,
    released: AtomicBool,
}

impl BlockReady {
    pub fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.ready
                .holds
                .lock()
                .expect("not poisoned")
                .remove(&self.id);
        }
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failures(t: &Tasks) -> String {
        let mut r = Registry::default();
        t.metrics().register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_that_dies_is_counted_and_the_drain_waits_for_the_rest() {
        let t = Tasks::new();
        t.spawn("fails", |_| async { Err::<(), _>("no API") });
        t.spawn("panics", |_| async {
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        });
        t.spawn("returns", |_| async { Ok::<(), String>(()) });
        // Runs until told to stop, then takes a moment to finish.
        t.spawn("drains", |s| async move {
            s.wait().await;
            Ok::<(), String>(())
        });
        let stop = t.shutdown();
        t.spawn_thread("thread", move |_| {
            while !stop.is_set() {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok::<(), String>(())
        })
        .unwrap();
        t.spawn_thread("thread-panics", |_| -> Result<(), String> {
            panic!("boom")
        })
        .unwrap();
        // A worker whose inputs closed ended as it should; one that failed did not.
        t.spawn_worker("worker", |_| Ok::<(), String>(())).unwrap();
        t.spawn_worker("worker-fails", |_| Err::<(), _>("disk gone"))
            .unwrap();
        let dead = Arc::new(AtomicBool::new(false));
        let d = dead.clone();
        t.watch("watched", move || !d.load(Ordering::Relaxed));
        dead.store(true, Ordering::Relaxed);
        let expected = [
            r#"kloak_task_failures_total{task="fails",how="error"} 1"#,
            r#"kloak_task_failures_total{task="panics",how="panic"} 1"#,
            r#"kloak_task_failures_total{task="returns",how="ended"} 1"#,
            r#"kloak_task_failures_total{task="thread-panics",how="panic"} 1"#,
            r#"kloak_task_failures_total{task="watched",how="error"} 1"#,
            r#"kloak_task_failures_total{task="worker-fails",how="error"} 1"#,
        ];
        // The watcher looks once a second: wait for it, on a busy machine too.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = failures(&t);
            if expected.iter().all(|l| text.contains(l)) || std::time::Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for line in expected {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("drains"), "{text}");
        assert!(!text.contains(r#"task="worker""#), "{text}");
        let late = tokio::task::spawn_blocking(move || t.drain(Duration::from_secs(2)))
            .await
            .unwrap();
        assert!(late.is_empty(), "{late:?}");
    }

    #[test]
    fn a_thread_that_ignores_shutdown_is_named_by_the_drain() {
        let t = Tasks::new();
        t.spawn_thread("stuck", |_| {
            std::thread::sleep(Duration::from_millis(500));
            Ok::<(), String>(())
        })
        .unwrap();
        assert_eq!(t.drain(Duration::from_millis(50)), vec!["stuck"]);
    }

    #[test]
    fn readiness_waits_for_every_hold() {
        let r = Ready::default();
        assert!(r.is_ready());
        let a = r.block("datapath");
        let b = r.block("api");
        assert_eq!(r.pending(), vec!["datapath", "api"]);
        a.release();
        a.release();
        assert_eq!(r.pending(), vec!["api"]);
        drop(b);
        assert!(r.is_ready());
    }
}
