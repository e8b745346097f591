//! Span export throughput: how many substitution events per second the
//! audit pipeline (`kloak_observability::Audit`: bounded queue, span
//! building, OTLP/gRPC batches) turns into spans a real Jaeger accepts, and
//! what `record` (the data path's only cost) takes per event meanwhile.
//! Compared in the same run: rates of 10k, 20k and 40k events/s, a flat-out
//! burst, and a collector that is gone (nothing exported, the queue full).
//!
//! `sudo scripts/bench.sh` runs it; it writes target/bench/spans.json.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use kloak_e2e::otel::jaeger;
use kloak_e2e::workspace_root;
use kloak_observability::{Audit, AuditEvent, OtelSettings, Outcome, SecretRef, Workload};

const EVENTS: usize = 200_000;

fn event(i: usize) -> AuditEvent {
    let now = SystemTime::now();
    AuditEvent {
        outcome: if i.is_multiple_of(10) {
            Outcome::Blocked
        } else {
            Outcome::Rewritten
        },
        start: now - Duration::from_micros(120),
        end: now,
        secret: Some(SecretRef::parse("shop/db/password")),
        workload: Workload::Pod {
            namespace: "shop".into(),
            pod: format!("web-{}", i % 50),
            container: "app".into(),
        },
        pid: 1000 + (i % 50) as u32,
        library: "openssl",
        function: "SSL_write_ex",
        backend: "pause",
        peer: Some(("10.0.0.7".parse().unwrap(), 443)),
        hostname: Some("db.shop.svc.cluster.local".into()),
        bytes: 512,
        paused: Some(Duration::from_micros(90)),
        reason: i
            .is_multiple_of(10)
            .then_some("destination not allowed for this secret"),
    }
}

/// Offers `rate` events per second (0 = as fast as possible) for `n` events;
/// returns per-record nanoseconds.
fn offer(a: &Audit, n: usize, rate: u64) -> Vec<u64> {
    let mut ns = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        if let Some(step) = 1_000_000_000u64.checked_div(rate) {
            let due = t0 + Duration::from_nanos(i as u64 * step);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
        }
        let e = event(i);
        let t = Instant::now();
        a.record(e);
        ns.push(t.elapsed().as_nanos() as u64);
    }
    ns
}

fn pct(mut v: Vec<u64>) -> serde_json::Value {
    v.sort_unstable();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    serde_json::json!({"p50_ns": at(0.5), "p99_ns": at(0.99), "p999_ns": at(0.999), "max_ns": v[v.len()-1]})
}

fn wait_drained(a: &Audit, offered: u64) -> f64 {
    let t = Instant::now();
    loop {
        let s = &a.stats;
        let done = s.exported.load(Ordering::Relaxed)
            + s.dropped_export_failed.load(Ordering::Relaxed)
            + s.dropped_queue_full.load(Ordering::Relaxed);
        if done >= offered || t.elapsed() > Duration::from_secs(120) {
            return t.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let j = jaeger();
    let settings = |svc: &str| {
        let mut s = OtelSettings::new(j.otlp.clone(), "bench", Some("node-bench"));
        s.resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(svc.to_string())
            .build();
        s
    };

    // 1. Sustained rates, 5 s each: what gets exported with nothing dropped.
    let mut sustained = Vec::new();
    for rate in [10_000u64, 20_000, 40_000] {
        let n = (rate * 5) as usize;
        let a = Audit::start(settings(&format!("kloak-bench-{rate}")), 8192).unwrap();
        let t = Instant::now();
        let rec = offer(&a, n, rate);
        let offered_secs = t.elapsed().as_secs_f64();
        let drain = wait_drained(&a, n as u64);
        let s = &a.stats;
        sustained.push(serde_json::json!({
            "offered_per_sec": rate, "events": n, "offered_secs": offered_secs,
            "drain_after_secs": drain,
            "exported": s.exported.load(Ordering::Relaxed),
            "dropped_queue_full": s.dropped_queue_full.load(Ordering::Relaxed),
            "dropped_export_failed": s.dropped_export_failed.load(Ordering::Relaxed),
            "record": pct(rec),
        }));
    }

    // 2. Flat out: as fast as the data path could offer them.
    let a = Audit::start(settings("kloak-bench-flat"), 8192).unwrap();
    let t = Instant::now();
    let rec_flat = offer(&a, EVENTS, 0);
    let offered_secs = t.elapsed().as_secs_f64();
    wait_drained(&a, EVENTS as u64);
    let total = t.elapsed().as_secs_f64();
    let s = &a.stats;
    let exported = s.exported.load(Ordering::Relaxed);
    let flat = serde_json::json!({
        "events": EVENTS, "offered_secs": offered_secs, "total_secs": total,
        "exported": exported,
        "exported_per_sec": exported as f64 / total,
        "dropped_queue_full": s.dropped_queue_full.load(Ordering::Relaxed),
        "dropped_export_failed": s.dropped_export_failed.load(Ordering::Relaxed),
        "record": pct(rec_flat),
    });

    // 3. Collector gone: an endpoint nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let a = Audit::start(
        OtelSettings::new(format!("http://127.0.0.1:{port}"), "bench", None),
        8192,
    )
    .unwrap();
    let rec_dead = offer(&a, 100_000, 10_000);
    let dead = serde_json::json!({
        "events": 100_000, "offered_per_sec": 10_000,
        "queued": a.stats.queued.load(Ordering::Relaxed),
        "dropped_queue_full": a.stats.dropped_queue_full.load(Ordering::Relaxed),
        "record": pct(rec_dead),
    });

    let out = serde_json::json!({
        "sustained": sustained, "flat_out": flat, "collector_gone": dead,
    });
    let path = workspace_root().join("target/bench/spans.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
