//! The admin port: `/healthz`, `/readyz` (with details) and `/metrics`,
//! plain HTTP and apart from the webhook's TLS port, for kubelet probes and
//! Prometheus.
//!
//! Readiness means the data path serves: maps loaded (from the state file
//! when there is one) and probes attached. Reconciling with the API comes
//! after and is reported, not waited for, so that a restart serves the
//! connections it restored without waiting on the API server. A state file
//! that fell back to memory (full disk, unusable file) keeps the agent
//! ready: it serves as before, only a further restart would start empty.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::node::tasks::{BlockReady, Ready, TaskMetrics, Tasks};
use crate::state::mirror::MirrorStats;

/// Where the data path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Datapath {
    Off = 0,
    Starting = 1,
    Ready = 2,
}

/// How the state file is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateMode {
    /// `--no-state`.
    Off,
    /// Followed into the file.
    File,
    /// Serving from memory only: the file could not be opened or written.
    Memory { reason: String },
}

/// Records restored from the state file at start.
#[derive(Debug, Default, Clone, Copy)]
pub struct RestoredCounts {
    pub secrets: u64,
    pub containers: u64,
    pub dns_answers: u64,
    pub connections: u64,
    pub tls_objects: u64,
}

/// What the admin endpoints report; the controller fills it in as it starts.
#[derive(Debug)]
pub struct Health {
    datapath: AtomicU8,
    reconciled: AtomicBool,
    state_path: Option<String>,
    state: Mutex<StateMode>,
    mirror: OnceLock<Arc<MirrorStats>>,
    restored: OnceLock<RestoredCounts>,
    audit: OnceLock<Arc<kloak_observability::AuditStats>>,
    /// The data path's hash maps and the agent's counters, once loaded.
    datapath_info: OnceLock<(
        Vec<kloak_bpf::MapInfo>,
        Arc<crate::datapath::record::Counters>,
    )>,
    started_ms: AtomicU64,
    /// What the data path and the reconciler count.
    pub metrics: Arc<crate::datapath::metrics::Metrics>,
    /// Holds on readiness; the data path's (or, without one, the API's)
    /// is taken at start.
    pub ready: Ready,
    start_hold: Mutex<Option<BlockReady>>,
    /// Background tasks that ended before shutdown.
    pub tasks: Arc<TaskMetrics>,
}

impl Health {
    pub fn new(datapath: bool, state_path: Option<String>) -> Arc<Health> {
        let ready = Ready::default();
        let state = if state_path.is_some() {
            StateMode::File
        } else {
            StateMode::Off
        };
        Arc::new(Health {
            datapath: AtomicU8::new(if datapath {
                Datapath::Starting as u8
            } else {
                Datapath::Off as u8
            }),
            reconciled: AtomicBool::new(false),
            state_path,
            state: Mutex::new(state),
            mirror: OnceLock::new(),
            restored: OnceLock::new(),
            audit: OnceLock::new(),
            datapath_info: OnceLock::new(),
            started_ms: AtomicU64::new(0),
            metrics: Arc::default(),
            start_hold: Mutex::new(Some(ready.block(if datapath { "datapath" } else { "api" }))),
            ready,
            tasks: Arc::default(),
        })
    }

    /// The data path serves from now on; `after` is the time since start.
    pub fn datapath_ready(&self, after: std::time::Duration) {
        if self.is_datapath_ready() {
            return;
        }
        self.started_ms
            .store(after.as_millis() as u64, Ordering::Relaxed);
        self.datapath
            .store(Datapath::Ready as u8, Ordering::Release);
        self.release_start_hold();
    }

    fn release_start_hold(&self) {
        if let Some(h) = self.start_hold.lock().expect("not poisoned").take() {
            h.release();
        }
    }

    pub fn is_datapath_ready(&self) -> bool {
        self.datapath() == Datapath::Ready
    }

    pub fn reconciled(&self) {
        self.reconciled.store(true, Ordering::Release);
        // Without a data path there is nothing to serve but the API.
        if self.datapath() == Datapath::Off {
            self.release_start_hold();
        }
    }

    pub fn state_in_memory(&self, reason: String) {
        *self.state.lock().expect("not poisoned") = StateMode::Memory { reason };
    }

    pub fn follow_mirror(&self, stats: Arc<MirrorStats>, restored: RestoredCounts) {
        let _ = self.mirror.set(stats);
        let _ = self.restored.set(restored);
    }

    pub fn follow_datapath(
        &self,
        maps: Vec<kloak_bpf::MapInfo>,
        counters: Arc<crate::datapath::record::Counters>,
    ) {
        let _ = self.datapath_info.set((maps, counters));
    }

    pub fn follow_audit(&self, stats: Arc<kloak_observability::AuditStats>) {
        let _ = self.audit.set(stats);
    }

    fn datapath(&self) -> Datapath {
        match self.datapath.load(Ordering::Acquire) {
            0 => Datapath::Off,
            1 => Datapath::Starting,
            _ => Datapath::Ready,
        }
    }

    /// The state file's mode, counting a mirror that degraded since start.
    pub fn state_mode(&self) -> StateMode {
        let mode = self.state.lock().expect("not poisoned").clone();
        match (&mode, self.mirror.get()) {
            (StateMode::File, Some(m)) if m.degraded.load(Ordering::Relaxed) => StateMode::Memory {
                reason: m
                    .last_error
                    .lock()
                    .expect("not poisoned")
                    .clone()
                    .unwrap_or_else(|| "the state file failed".into()),
            },
            _ => mode,
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.is_ready()
    }

    pub fn details(&self) -> serde_json::Value {
        let state = match self.state_mode() {
            StateMode::Off => serde_json::json!({"mode": "off"}),
            StateMode::File => serde_json::json!({"mode": "file", "path": self.state_path}),
            StateMode::Memory { reason } => serde_json::json!({
                "mode": "memory", "path": self.state_path, "degraded": true, "reason": reason,
            }),
        };
        serde_json::json!({
            "ready": self.is_ready(),
            "waiting_for": self.ready.pending(),
            "datapath": match self.datapath() {
                Datapath::Off => "off",
                Datapath::Starting => "starting",
                Datapath::Ready => "ready",
            },
            "ready_after_ms": self.started_ms.load(Ordering::Relaxed),
            "api": if self.reconciled.load(Ordering::Acquire) { "reconciled" } else { "syncing" },
            "state": state,
        })
    }
}

/// Reads the counters at scrape time: the data path keeps its own atomics
/// and never waits on a scrape.
#[derive(Debug)]
struct StateCollector(Arc<Health>);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        gauge(
            &mut enc,
            "kloak_ready",
            "1 when the data path serves (maps loaded, probes attached)",
            i64::from(h.is_ready()),
        )?;
        let (degraded, file) = match h.state_mode() {
            StateMode::Off => (0, 0),
            StateMode::File => (0, 1),
            StateMode::Memory { .. } => (1, 0),
        };
        gauge(
            &mut enc,
            "kloak_state_degraded",
            "1 when the state file fell back to memory (full disk, unusable file): a restart would start empty",
            degraded,
        )?;
        gauge(
            &mut enc,
            "kloak_state_file_enabled",
            "1 while state is followed into the state file",
            file,
        )?;
        if let Some(m) = h.mirror.get() {
            counter(
                &mut enc,
                "kloak_state_commits",
                "Batches committed to the state file",
                m.batches.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "kloak_state_records_written",
                "Records committed to the state file",
                m.records.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "kloak_state_write_failures",
                "Commits to the state file that failed",
                m.failures.load(Ordering::Relaxed),
            )?;
        }
        if let Some((maps, counters)) = h.datapath_info.get() {
            let m = &h.metrics;
            counter(
                &mut enc,
                "kloak_ringbuf_lost_events",
                "tls_events records the kernel could not queue (ring buffer full); their placeholders went out unchanged",
                m.ring_lost.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "kloak_require_wire_unserved",
                "Placeholders of require-wire secrets the kernel sent unchanged: the wire could not serve their write, and no other backend may",
                m.require_wire_unserved.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "kloak_attach_errors",
                "TLS libraries or socket hooks the agent failed to attach to",
                counters.attach_errors.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut enc,
                "kloak_wire_veths",
                "Pods' host-side veths carrying the wire backend's tc programs",
                counters.wire_veths.load(Ordering::Relaxed) as i64,
            )?;
            counter(
                &mut enc,
                "kloak_wire_hook_errors",
                "Pods' veths that refused the wire backend's tc programs (their pods' writes go to pause)",
                counters.wire_hook_errors.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut enc,
                "kloak_tracked_processes",
                "Processes in the containers the agent tracks",
                m.tracked_processes.load(Ordering::Relaxed) as i64,
            )?;
            let g = ConstGauge::new(0i64);
            let mut fam = enc.encode_descriptor(
                "kloak_bpf_map_entries",
                "Entries in each BPF hash map",
                None,
                g.metric_type(),
            )?;
            for map in maps {
                if let Ok(n) = map.entries() {
                    ConstGauge::new(n as i64)
                        .encode(fam.encode_family(&[("map", map.name.as_str())])?)?;
                }
            }
            let mut fam = enc.encode_descriptor(
                "kloak_bpf_map_capacity",
                "Entries each BPF hash map can hold",
                None,
                g.metric_type(),
            )?;
            for map in maps {
                ConstGauge::new(i64::from(map.capacity))
                    .encode(fam.encode_family(&[("map", map.name.as_str())])?)?;
            }
        }
        if let Some(a) = h.audit.get() {
            counter(
                &mut enc,
                "kloak_spans_queued",
                "Substitution events queued for export as spans",
                a.queued.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "kloak_spans_exported",
                "Spans the OTLP collector accepted",
                a.exported.load(Ordering::Relaxed),
            )?;
            let c = ConstCounter::new(0u64);
            let mut fam = enc.encode_descriptor(
                "kloak_spans_dropped",
                "Spans dropped: the queue was full, or their export failed or timed out",
                None,
                c.metric_type(),
            )?;
            for (reason, n) in [
                ("queue_full", a.dropped_queue_full.load(Ordering::Relaxed)),
                (
                    "export_failed",
                    a.dropped_export_failed.load(Ordering::Relaxed),
                ),
            ] {
                ConstCounter::new(n).encode(fam.encode_family(&[("reason", reason)])?)?;
            }
        }
        if let Some(r) = h.restored.get() {
            let c = ConstGauge::new(0i64);
            let mut fam = enc.encode_descriptor(
                "kloak_state_restored_records",
                "Records loaded from the state file at start, by kind",
                None,
                c.metric_type(),
            )?;
            for (kind, n) in [
                ("secret", r.secrets),
                ("container", r.containers),
                ("dns_answer", r.dns_answers),
                ("connection", r.connections),
                ("tls_object", r.tls_objects),
            ] {
                let labels = [("kind", kind)];
                ConstGauge::new(n as i64).encode(fam.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
struct App {
    health: Arc<Health>,
    registry: Arc<Registry>,
    log: Option<kloak_observability::LogHandle>,
}

/// `GET /logging`: the log filter in force. `PUT /logging` with a filter
/// (`RUST_LOG` syntax, e.g. `debug` or `info,kloak::datapath=trace`) as the
/// body: swaps it at once, no restart.
async fn get_logging(State(app): State<App>) -> impl IntoResponse {
    match &app.log {
        Some(l) => (StatusCode::OK, format!("{}\n", l.current())),
        None => (StatusCode::NOT_FOUND, "no log handle\n".to_string()),
    }
}

async fn put_logging(State(app): State<App>, body: String) -> impl IntoResponse {
    let Some(l) = &app.log else {
        return (StatusCode::NOT_FOUND, "no log handle\n".to_string());
    };
    match l.set(body.trim()) {
        Ok(()) => {
            tracing::info!(filter = %body.trim(), "log filter changed");
            (StatusCode::OK, format!("{}\n", l.current()))
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<App>) -> impl IntoResponse {
    let code = if app.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(app.health.details()))
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    // Counting map entries walks keys with syscalls: not on a runtime thread.
    let registry = app.registry.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).map(|()| out)
    })
    .await;
    match encoded {
        Ok(Ok(out)) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "encoding the metrics failed\n".to_string(),
        ),
    }
}

pub fn router(health: Arc<Health>, log: Option<kloak_observability::LogHandle>) -> Router {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StateCollector(health.clone())));
    health.metrics.register(&mut registry);
    health.tasks.register(&mut registry);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/logging", get(get_logging).put(put_logging))
        .with_state(App {
            health,
            registry: Arc::new(registry),
            log,
        })
}

/// Binds the admin port now (a taken port is a start-up error, not a silent
/// gap in monitoring) and serves it in the background.
/// Binds the admin port and serves it as a supervised task until shutdown.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    log: Option<kloak_observability::LogHandle>,
    tasks: &Tasks,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tasks.spawn("admin-server", move |shutdown| async move {
        axum::serve(listener, router(health, log))
            .with_graceful_shutdown(shutdown.wait())
            .await
    });
    tracing::info!(addr = %local, "admin server listening (/healthz, /readyz, /metrics)");
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_data_path_and_a_degraded_mirror_stays_ready() {
        let h = Health::new(true, Some("/run/kloak/state.redb".into()));
        assert!(!h.is_ready());
        assert_eq!(h.details()["datapath"], "starting");
        let stats = Arc::new(MirrorStats::default());
        h.follow_mirror(stats.clone(), RestoredCounts::default());
        h.datapath_ready(std::time::Duration::from_millis(12));
        assert!(h.is_ready());
        assert_eq!(h.details()["state"]["mode"], "file");
        stats.degraded.store(true, Ordering::Relaxed);
        *stats.last_error.lock().unwrap() = Some("No space left on device".into());
        let d = h.details();
        assert_eq!(d["ready"], true);
        assert_eq!(d["state"]["mode"], "memory");
        assert_eq!(d["state"]["reason"], "No space left on device");
    }

    #[test]
    fn metrics_name_the_degraded_state() {
        let h = Health::new(true, None);
        h.state_in_memory("opening failed".into());
        let mut r = Registry::default();
        r.register_collector(Box::new(StateCollector(h)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(out.contains("kloak_state_degraded 1"), "{out}");
        assert!(out.contains("kloak_ready 0"), "{out}");
        assert!(out.ends_with("# EOF\n"));
    }

    #[test]
    fn without_a_data_path_ready_means_reconciled() {
        let h = Health::new(false, None);
        assert!(!h.is_ready());
        h.reconciled();
        assert!(h.is_ready());
    }
}
