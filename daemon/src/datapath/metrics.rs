//! The data path's and the reconciler's metrics, in Prometheus form. One
//! struct, shared by the agent thread (which only increments) and the admin
//! server (which encodes). Labels stay low in cardinality: no pod, no
//! secret, no destination.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
    pub backend: &'static str,
    pub library: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    /// Every placeholder event by what became of it.
    pub substitutions: Family<OutcomeLabels, Counter>,
    /// Placeholders that went out unchanged, by why.
    pub blocked: Family<ReasonLabels, Counter>,
    /// How long a writer stayed stopped (pause backend): from the kernel's
    /// stop to SIGCONT.
    pub pause: Histogram,
    /// One reconcile pass over the changed Secrets (shadow + data path).
    pub sync: Histogram,
    /// Copied from the kernel's counters by the agent now and then.
    pub ring_lost: std::sync::atomic::AtomicU64,
    pub require_wire_unserved: std::sync::atomic::AtomicU64,
    /// Processes in the tracked containers, counted by the agent now and then.
    pub tracked_processes: std::sync::atomic::AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            substitutions: Family::default(),
            blocked: Family::default(),
            // 10 µs .. ~1.3 s.
            pause: Histogram::new(exponential_buckets(0.000_01, 2.0, 18)),
            // 1 ms .. ~33 s.
            sync: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            ring_lost: Default::default(),
            require_wire_unserved: Default::default(),
            tracked_processes: Default::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "kloak_substitutions",
            "Placeholder events by outcome (rewritten, blocked, unknown_placeholder, scrubbed), backend and TLS library",
            self.substitutions.clone(),
        );
        r.register(
            "kloak_blocked",
            "Placeholders sent unchanged because the destination or the pod was not allowed",
            self.blocked.clone(),
        );
        r.register(
            "kloak_pause_duration_seconds",
            "Time a writer was stopped, from the kernel's stop to SIGCONT",
            self.pause.clone(),
        );
        r.register(
            "kloak_secret_sync_duration_seconds",
            "Duration of a reconcile pass over changed Secrets",
            self.sync.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prometheus_conventions() {
        let m = Metrics::default();
        m.substitutions
            .get_or_create(&OutcomeLabels {
                outcome: "rewritten",
                backend: "pause",
                library: "openssl",
            })
            .inc();
        m.pause.observe(0.0002);
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(
            out.contains(
                r#"kloak_substitutions_total{outcome="rewritten",backend="pause",library="openssl"} 1"#
            ),
            "{out}"
        );
        assert!(
            out.contains("kloak_pause_duration_seconds_count 1"),
            "{out}"
        );
    }
}
