//! One span per substitution event: which workload sent which secret (never
//! its value) to which destination, when, by which path, and what Kloak
//! did about it.
//!
//! The data path only hands an [`AuditEvent`] to a bounded queue
//! (`try_send`: a full queue drops the event and counts it, it never
//! waits). One thread turns events into spans with the kernel's timestamp
//! as their start, batches them, and exports each batch over OTLP with a
//! timeout. A slow or absent collector therefore costs the data path
//! nothing and memory stays bounded by the queue and one batch.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};

use crate::{Error, OtelSettings};

/// Spans per OTLP export call.
const BATCH: usize = 512;
/// How often an idle export thread looks at the queue.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// How long a partial batch waits before it goes.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// One export may take this long; then its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The real value went out in place of the placeholder.
    Rewritten,
    /// The placeholder went out unchanged: the destination is not allowed,
    /// or the writer's pod does not reference the secret.
    Blocked,
    /// A `kloak:` token that names no secret; left unchanged.
    UnknownPlaceholder,
    /// A placeholder cut by the end of a write: it cannot be rewritten.
    Split,
    /// The placeholder was put back in the application's buffer after the write.
    Scrubbed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Rewritten => "rewritten",
            Outcome::Blocked => "blocked",
            Outcome::UnknownPlaceholder => "unknown_placeholder",
            Outcome::Split => "split",
            Outcome::Scrubbed => "scrubbed",
        }
    }
}

/// `namespace/name/key` in Kubernetes; standalone secrets have a name only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: Option<String>,
    pub name: String,
    pub key: Option<String>,
}

impl SecretRef {
    /// Parses the agent's `ns/name/key` (or a bare standalone name).
    pub fn parse(full: &str) -> SecretRef {
        let mut it = full.splitn(3, '/');
        match (it.next(), it.next(), it.next()) {
            (Some(ns), Some(name), Some(key)) => SecretRef {
                namespace: Some(ns.into()),
                name: name.into(),
                key: Some(key.into()),
            },
            _ => SecretRef {
                namespace: None,
                name: full.into(),
                key: None,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    Pod {
        namespace: String,
        pod: String,
        container: String,
    },
    Process {
        pid: u32,
        comm: String,
        exe: Option<String>,
    },
}

/// What the data path knows about one event; never a secret value.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub outcome: Outcome,
    /// When the kernel saw the write.
    pub start: SystemTime,
    /// When the agent was done with it.
    pub end: SystemTime,
    pub secret: Option<SecretRef>,
    pub workload: Workload,
    pub pid: u32,
    pub library: &'static str,
    pub function: &'static str,
    pub backend: &'static str,
    pub peer: Option<(IpAddr, u16)>,
    /// The name a trusted DNS answer gave the peer, if any.
    pub hostname: Option<String>,
    pub bytes: u64,
    /// How long the writer was stopped (pause backend).
    pub paused: Option<Duration>,
    /// Why, for a blocked event.
    pub reason: Option<&'static str>,
}

impl AuditEvent {
    fn attributes(&self) -> Vec<KeyValue> {
        let mut a = vec![
            KeyValue::new("kloak.outcome", self.outcome.as_str()),
            KeyValue::new("kloak.backend", self.backend),
            KeyValue::new("kloak.tls.library", self.library),
            KeyValue::new("code.function.name", self.function),
            KeyValue::new("kloak.write.bytes", self.bytes as i64),
            KeyValue::new("process.pid", i64::from(self.pid)),
        ];
        if let Some(s) = &self.secret {
            if let Some(ns) = &s.namespace {
                a.push(KeyValue::new("kloak.secret.namespace", ns.clone()));
            }
            a.push(KeyValue::new("kloak.secret.name", s.name.clone()));
            if let Some(k) = &s.key {
                a.push(KeyValue::new("kloak.secret.key", k.clone()));
            }
        }
        match &self.workload {
            Workload::Pod {
                namespace,
                pod,
                container,
            } => {
                a.push(KeyValue::new("k8s.namespace.name", namespace.clone()));
                a.push(KeyValue::new("k8s.pod.name", pod.clone()));
                a.push(KeyValue::new("k8s.container.name", container.clone()));
            }
            Workload::Process { comm, exe, .. } => {
                a.push(KeyValue::new("process.executable.name", comm.clone()));
                if let Some(e) = exe {
                    a.push(KeyValue::new("process.executable.path", e.clone()));
                }
            }
        }
        if let Some((ip, port)) = self.peer {
            a.push(KeyValue::new("network.peer.address", ip.to_string()));
            a.push(KeyValue::new("network.peer.port", i64::from(port)));
            a.push(KeyValue::new("server.port", i64::from(port)));
        }
        if let Some(h) = &self.hostname {
            a.push(KeyValue::new("server.address", h.clone()));
        }
        if let Some(p) = self.paused {
            a.push(KeyValue::new(
                "kloak.pause.duration_us",
                Value::I64(p.as_micros() as i64),
            ));
        }
        if let Some(r) = self.reason {
            a.push(KeyValue::new("kloak.blocked.reason", r));
        }
        a
    }
}

#[derive(Debug, Default)]
pub struct AuditStats {
    pub queued: AtomicU64,
    /// Dropped because the queue was full (the exporter fell behind).
    pub dropped_queue_full: AtomicU64,
    /// Dropped because their export failed or timed out.
    pub dropped_export_failed: AtomicU64,
    pub exported: AtomicU64,
    pub export_batches: AtomicU64,
}

/// The data path's end: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Audit {
    tx: SyncSender<AuditEvent>,
    pub stats: Arc<AuditStats>,
    /// Closed by the export thread when it has sent its last batch.
    finished: Arc<Mutex<Option<mpsc::Receiver<()>>>>,
}

impl Audit {
    /// Queues an event for export; a full queue drops it (counted).
    pub fn record(&self, e: AuditEvent) {
        match self.tx.try_send(e) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether the export thread still runs, asked without holding a
    /// handle (a handle would keep the thread from finishing).
    pub fn liveness(&self) -> impl Fn() -> bool + Send + 'static {
        let finished = Arc::downgrade(&self.finished);
        move || {
            let Some(f) = finished.upgrade() else {
                return false;
            };
            let f = f.lock().expect("not poisoned");
            // Taken by `finish`: the agent is stopping it on purpose.
            let Some(rx) = f.as_ref() else { return true };
            matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty))
        }
    }

    /// Exports what is queued and stops, waiting at most `timeout`. Call it
    /// on the last handle, once the data path (which holds clones) is gone.
    pub fn finish(self, timeout: Duration) {
        let finished = self.finished.lock().expect("not poisoned").take();
        drop(self);
        if let Some(rx) = finished {
            let _ = rx.recv_timeout(timeout);
        }
    }

    /// Starts the export thread. `queue` bounds the events waiting.
    pub fn start(settings: OtelSettings, queue: usize) -> Result<Audit, Error> {
        let (tx, rx) = mpsc::sync_channel(queue);
        let stats = Arc::new(AuditStats::default());
        let st = stats.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("kloak-audit".into())
            .spawn(move || {
                export_loop(settings, rx, &st, ready_tx);
                drop(done_tx);
            })?;
        ready_rx
            .recv()
            .map_err(|_| Error::Subscriber("the span export thread exited".into()))??;
        Ok(Audit {
            tx,
            stats,
            finished: Arc::new(Mutex::new(Some(done_rx))),
        })
    }
}

/// Collects what the tracer ends, for the export loop to send itself.
#[derive(Debug, Default, Clone)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Collect {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}
    fn on_end(&self, span: SpanData) {
        self.0.lock().expect("not poisoned").push(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

fn export_loop(
    settings: OtelSettings,
    rx: mpsc::Receiver<AuditEvent>,
    stats: &AuditStats,
    ready: mpsc::Sender<Result<(), Error>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(Error::Thread(e)));
            return;
        }
    };
    let _guard = rt.enter();
    let mut exporter = match settings.exporter() {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    exporter.set_resource(&settings.resource);
    let collected = Collect::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_resource(settings.resource.clone())
        .with_span_processor(collected.clone())
        .build();
    let tracer = provider.tracer("kloak-audit");
    let _ = ready.send(Ok(()));
    let mut pending = 0usize;
    let mut since = Instant::now();
    loop {
        // Polled, not waited on: a sender never has a sleeping receiver to
        // wake, so `record` stays a queue push (no futex call) on the data path.
        let (event, done) = match rx.try_recv() {
            Ok(e) => (Some(e), false),
            Err(TryRecvError::Empty) => (None, false),
            Err(TryRecvError::Disconnected) => (None, true),
        };
        if let Some(mut e) = event {
            // Resolved here, off the data path; the process may be gone.
            if let Workload::Process {
                pid,
                exe: exe @ None,
                ..
            } = &mut e.workload
            {
                *exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                    .ok()
                    .map(|p| p.display().to_string());
            }
            let mut span = tracer
                .span_builder(format!("kloak {}", e.outcome.as_str()))
                .with_kind(SpanKind::Internal)
                .with_start_time(e.start)
                .with_attributes(e.attributes())
                .start(&tracer);
            if e.outcome == Outcome::Blocked {
                span.set_status(Status::error(e.reason.unwrap_or("blocked")));
            }
            span.end_with_timestamp(e.end);
            if pending == 0 {
                since = Instant::now();
            }
            pending += 1;
            if pending < BATCH {
                continue;
            }
        } else if !done && (pending == 0 || since.elapsed() < FLUSH_EVERY) {
            std::thread::sleep(POLL_EVERY);
            continue;
        }
        let batch = std::mem::take(&mut *collected.0.lock().expect("not poisoned"));
        pending = 0;
        let n = batch.len() as u64;
        if n > 0 {
            let r = rt.block_on(async {
                tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await
            });
            stats.export_batches.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(Ok(())) => {
                    stats.exported.fetch_add(n, Ordering::Relaxed);
                }
                _ => {
                    stats.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        if done {
            let _ = exporter.shutdown();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_refs_split_into_their_parts() {
        assert_eq!(
            SecretRef::parse("shop/db/password"),
            SecretRef {
                namespace: Some("shop".into()),
                name: "db".into(),
                key: Some("password".into())
            }
        );
        assert_eq!(SecretRef::parse("API_TOKEN").name, "API_TOKEN");
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (tx, _rx) = mpsc::sync_channel(2);
        let a = Audit {
            tx,
            stats: Arc::default(),
            finished: Arc::default(),
        };
        let e = AuditEvent {
            outcome: Outcome::Rewritten,
            start: SystemTime::now(),
            end: SystemTime::now(),
            secret: None,
            workload: Workload::Process {
                pid: 1,
                comm: "x".into(),
                exe: None,
            },
            pid: 1,
            library: "openssl",
            function: "SSL_write",
            backend: "pause",
            peer: None,
            hostname: None,
            bytes: 10,
            paused: None,
            reason: None,
        };
        // A blocking send would hang here: nothing drains the queue.
        for _ in 0..1000 {
            a.record(e.clone());
        }
        assert_eq!(a.stats.queued.load(Ordering::Relaxed), 2);
        assert_eq!(a.stats.dropped_queue_full.load(Ordering::Relaxed), 998);
    }
}
