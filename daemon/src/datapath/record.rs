//! What became of each placeholder, counted once: one call per outcome
//! feeds the counters (`--stats-json`, logs), the Prometheus metrics and
//! the audit span together, so the three tallies cannot drift apart. Names
//! secrets, never their values.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use kloak_bpf::{Conn, Event, EventKind};
use kloak_observability::Outcome;
use serde::Serialize;

use crate::datapath::authorise::{BlockReason, Blocked};
use crate::datapath::backend::BackendKind;
use crate::datapath::metrics::{Metrics, OutcomeLabels, ReasonLabels};
use crate::datapath::secrets::Secret;

/// What the agent did, for `--stats-json` and logs. Counts only, no values.
#[derive(Debug, Default, Serialize)]
pub struct Counters {
    pub rewrites: AtomicU64,
    pub scrubs: AtomicU64,
    pub user_scans: AtomicU64,
    pub unknown_tokens: AtomicU64,
    /// Writes that ended inside a placeholder-like token (sent unchanged).
    pub splits: AtomicU64,
    pub mismatched: AtomicU64,
    pub stop_timeouts: AtomicU64,
    pub continued: AtomicU64,
    pub attached_files: AtomicU64,
    pub attach_errors: AtomicU64,
    pub patch_errors: AtomicU64,
    /// Placeholders left unchanged because the destination is not allowed.
    pub blocked: AtomicU64,
    pub dns_answers: AtomicU64,
    /// HPACK Huffman-coded placeholders swapped (also counted in `rewrites`).
    pub huffman_rewrites: AtomicU64,
    /// TLS files whose probes were dropped after their last process exited.
    pub detached_files: AtomicU64,
    pub dns_untrusted: AtomicU64,
    /// Placeholders left unchanged because the writer's pod does not
    /// reference their Secret (it learned the placeholder some other way).
    pub unbound: AtomicU64,
    /// Batches of stopped processes handled, and where their time went:
    /// kernel event to agent awake, waiting for the group stop, patch + SIGCONT.
    pub pause_batches: AtomicU64,
    pub wake_ns_total: AtomicU64,
    pub stop_wait_ns_total: AtomicU64,
    pub patch_ns_total: AtomicU64,
    /// Wire backend: placeholders armed for a patch on the wire, and those
    /// its records did not carry as expected (sent unchanged).
    pub wire_armed: AtomicU64,
    pub wire_misses: AtomicU64,
    /// Wire backend: writes stopped until a destination was decided.
    pub wire_decisions: AtomicU64,
    /// Placeholders of require-wire secrets left unchanged: the wire could
    /// not serve their write, and no other backend may.
    pub require_wire: AtomicU64,
    /// Node agent, wire backend: pods' host-side veths hooked now, and
    /// veths that refused the hooks (their pods' writes go to pause).
    pub wire_veths: AtomicU64,
    pub wire_hook_errors: AtomicU64,
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Where a tracked cgroup's processes run, for audit spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// The peer of the write, looked up only when a span is wanted.
pub type PeerLookup<'a> = &'a dyn Fn() -> (Option<Conn>, Option<String>);

pub struct Recorder {
    pub counters: Arc<Counters>,
    metrics: Arc<Metrics>,
    audit: Option<kloak_observability::Audit>,
    /// Pod, namespace and container of each tracked cgroup (or pid group).
    workloads: HashMap<u64, Arc<Workload>>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>, audit: Option<kloak_observability::Audit>) -> Self {
        Recorder {
            counters: Arc::default(),
            metrics,
            audit,
            workloads: HashMap::new(),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn set_workload(&mut self, group: u64, w: Workload) {
        self.workloads.insert(group, Arc::new(w));
    }

    pub fn forget_workload(&mut self, group: u64) {
        self.workloads.remove(&group);
    }

    /// A value written over a placeholder (or, `huffman`, over its HPACK code).
    pub fn rewritten(
        &self,
        e: &Event,
        s: &Secret,
        backend: BackendKind,
        huffman: bool,
        peer: PeerLookup<'_>,
    ) {
        inc(&self.counters.rewrites);
        if huffman {
            inc(&self.counters.huffman_rewrites);
            tracing::debug!(pid = e.tgid, comm = %e.comm, secret = %s.name, backend = backend.as_str(), "HPACK placeholder rewritten");
            // Spans and metrics count ASCII rewrites only, as before the
            // recorder existed; the Huffman swap is in `huffman_rewrites`.
            return;
        }
        tracing::debug!(pid = e.tgid, comm = %e.comm, secret = %s.name, backend = backend.as_str(), "placeholder rewritten");
        self.outcome(e, Outcome::Rewritten, Some(s), None, backend, peer);
    }

    /// The placeholder put back after the write returned.
    pub fn scrubbed(
        &self,
        e: &Event,
        s: Option<&Secret>,
        backend: BackendKind,
        peer: PeerLookup<'_>,
    ) {
        inc(&self.counters.scrubs);
        if let Some(s) = s {
            self.outcome(e, Outcome::Scrubbed, Some(s), None, backend, peer);
        }
    }

    /// The placeholder went out unchanged: counted, logged, a span with
    /// status error.
    pub fn blocked(
        &self,
        e: &Event,
        s: &Secret,
        b: &Blocked,
        backend: BackendKind,
        peer: PeerLookup<'_>,
    ) {
        let (reason, dest, names) = (b.reason, b.dest, &b.names);
        match reason {
            BlockReason::NotBound => {
                inc(&self.counters.unbound);
                tracing::warn!(
                    pid = e.tgid,
                    comm = %e.comm,
                    secret = %s.name,
                    "blocked: this pod does not reference the secret; the placeholder went out unchanged"
                );
            }
            BlockReason::Destination => {
                inc(&self.counters.blocked);
                tracing::warn!(
                    pid = e.tgid,
                    comm = %e.comm,
                    secret = %s.name,
                    destination = %dest.map_or_else(|| "unknown".to_string(), |d| d.to_string()),
                    verified_names = ?names,
                    "blocked: destination not allowed for this secret; the placeholder went out unchanged"
                );
            }
            BlockReason::RequireWire => {
                inc(&self.counters.require_wire);
                tracing::warn!(
                    pid = e.tgid,
                    comm = %e.comm,
                    secret = %s.name,
                    "blocked: the secret is served by the wire only (requireWire, or destination rules under the wire backend), which could not serve this write (suite, library, keys or socket); the placeholder went out unchanged"
                );
            }
        }
        self.metrics
            .blocked
            .get_or_create(&ReasonLabels {
                reason: reason.label(),
            })
            .inc();
        self.outcome(e, Outcome::Blocked, Some(s), Some(reason), backend, peer);
    }

    /// An event that left nothing stopped: the kernel finished it alone
    /// (in-place rewrites and scrubs) or found a token that names no secret
    /// or a write cut inside one. `cut_short` names whose placeholder a
    /// split cut, when exactly one fits.
    pub fn noted(
        &self,
        e: &Event,
        backend: BackendKind,
        cut_short: Option<&Secret>,
        by_id: &dyn Fn(u32) -> Option<Arc<Secret>>,
        peer: PeerLookup<'_>,
    ) {
        match e.kind {
            EventKind::Unknown => {
                self.counters
                    .unknown_tokens
                    .fetch_add(u64::from(e.unknown), Ordering::Relaxed);
                tracing::debug!(pid = e.tgid, comm = %e.comm, tokens = e.unknown, "unknown kloak: token left unchanged");
                self.outcome(e, Outcome::UnknownPlaceholder, None, None, backend, peer);
            }
            EventKind::Split => {
                inc(&self.counters.splits);
                tracing::debug!(pid = e.tgid, comm = %e.comm, "a write ended inside a kloak: token; it went out unchanged");
                self.outcome(e, Outcome::Split, cut_short, None, backend, peer);
            }
            EventKind::Rewritten | EventKind::Scrubbed => {
                let (counter, outcome) = if e.kind == EventKind::Rewritten {
                    (&self.counters.rewrites, Outcome::Rewritten)
                } else {
                    (&self.counters.scrubs, Outcome::Scrubbed)
                };
                counter.fetch_add(e.hits.len() as u64, Ordering::Relaxed);
                for h in &e.hits {
                    let s = by_id(h.secret_id);
                    self.outcome(e, outcome, s.as_deref(), None, backend, peer);
                }
            }
            _ => {}
        }
    }

    /// A stopped writer continued: how long it was stopped.
    pub fn paused(&self, e: &Event, now_ns: u64) {
        self.metrics
            .pause
            .observe(now_ns.saturating_sub(e.ts_ns) as f64 / 1e9);
    }

    /// Counts the outcome in the metrics and hands a span to the exporter
    /// (never blocks; nothing when export is off).
    fn outcome(
        &self,
        e: &Event,
        outcome: Outcome,
        secret: Option<&Secret>,
        reason: Option<BlockReason>,
        backend: BackendKind,
        peer: PeerLookup<'_>,
    ) {
        let library = e.abi.map_or("unknown", |x| x.library());
        let backend = backend.as_str();
        self.metrics
            .substitutions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
                backend,
                library,
            })
            .inc();
        let Some(a) = &self.audit else { return };
        let now_mono = mono_ns();
        let now = SystemTime::now();
        let start = now - Duration::from_nanos(now_mono.saturating_sub(e.ts_ns));
        let (conn, hostname) = peer();
        let workload = match self.workloads.get(&e.cgroup) {
            Some(w) => kloak_observability::Workload::Pod {
                namespace: w.namespace.clone(),
                pod: w.pod.clone(),
                container: w.container.clone(),
            },
            None => kloak_observability::Workload::Process {
                pid: e.tgid,
                comm: e.comm.clone(),
                exe: None,
            },
        };
        a.record(kloak_observability::AuditEvent {
            outcome,
            start,
            end: now,
            secret: secret.map(|s| kloak_observability::SecretRef::parse(&s.name)),
            workload,
            pid: e.tgid,
            library,
            function: e.abi.map_or("unknown", |x| x.function()),
            backend,
            peer: conn.map(|c| (c.dest.ip(), c.dest.port())),
            hostname,
            bytes: e.len,
            paused: e
                .kind
                .leaves_stopped()
                .then(|| Duration::from_nanos(now_mono.saturating_sub(e.ts_ns))),
            reason: reason.map(BlockReason::describe),
        });
    }
}

pub fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("monotonic clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::datapath::authorise::tests::{event, secret};
    use crate::datapath::rules::Rules;

    fn scrape(m: &Metrics) -> String {
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn each_outcome_is_counted_once_in_counters_and_metrics_with_its_backend() {
        let rec = Recorder::new(Arc::default(), None);
        let s = secret(1, "kloak:ABCDEFGH", b"value-01", Rules::default());
        let e = event(10, 5, Some(3));
        let none: PeerLookup<'_> = &|| panic!("no span is built without a collector");
        rec.rewritten(&e, &s, BackendKind::Pause, false, none);
        rec.rewritten(&e, &s, BackendKind::Pause, true, none);
        for reason in [BlockReason::NotBound, BlockReason::Destination] {
            let b = Blocked {
                reason,
                dest: None,
                names: Vec::new(),
            };
            rec.blocked(&e, &s, &b, BackendKind::Pause, none);
        }
        let mut kernel = e.clone();
        kernel.kind = EventKind::Rewritten;
        kernel.hits = vec![
            kloak_bpf::Hit {
                offset: 0,
                secret_id: 1,
                len: 14,
            };
            2
        ];
        let s2 = Arc::new(s.clone());
        rec.noted(
            &kernel,
            BackendKind::InPlace,
            None,
            &|_| Some(s2.clone()),
            none,
        );

        let c = &rec.counters;
        assert_eq!(c.rewrites.load(Ordering::Relaxed), 4);
        assert_eq!(c.huffman_rewrites.load(Ordering::Relaxed), 1);
        assert_eq!(c.unbound.load(Ordering::Relaxed), 1);
        assert_eq!(c.blocked.load(Ordering::Relaxed), 1);
        let text = scrape(rec.metrics());
        for line in [
            r#"kloak_substitutions_total{outcome="rewritten",backend="pause",library="openssl"} 1"#,
            r#"kloak_substitutions_total{outcome="rewritten",backend="inplace",library="openssl"} 2"#,
            r#"kloak_substitutions_total{outcome="blocked",backend="pause",library="openssl"} 2"#,
            r#"kloak_blocked_total{reason="not_bound"} 1"#,
            r#"kloak_blocked_total{reason="destination"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("value-01"), "a value in the metrics");
    }
}
