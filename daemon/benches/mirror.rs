//! What following the kernel into the state file costs.
//!
//! 1. The delay mirroring adds to the agent's event loop: per connection
//!    event, the work the loop does (`mirror::conn_op`: the process identity
//!    from a cache, the record) and the channel send, while the mirror
//!    thread commits to a real file on this disk at the same time. Baseline
//!    in the same run: the same loop with no mirror (what `--no-state` does:
//!    one branch), timed the same way, so the clock's own cost cancels.
//! 2. Bytes the file grows by per DNS answer and per connection, written in
//!    the mirror's batches.
//!
//! Writes target/bench/mirror.json. `cargo bench -p kloak --bench mirror`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kloak::state::mirror::{Mirror, conn_op};
use kloak_bpf::{Conn, ConnChange, ConnEvent};
use kloak_storage::{Batch, ConnKey, ConnRecord, DnsRecord, Key, Store};

const EVENTS: usize = 200_000;
const RECORDS: usize = 10_000;
/// Records per commit when measuring file growth: about what the mirror
/// gathers in one 50 ms window on a busy node.
const PER_BATCH: usize = 100;

fn events(n: usize) -> Vec<ConnEvent> {
    let me = std::process::id();
    (0..n)
        .map(|i| ConnEvent {
            tgid: me,
            fd: 3 + (i as i32 % 4000),
            group: 0,
            change: if i % 2 == 0 {
                ConnChange::Open(Conn {
                    dest: format!("10.{}.{}.{}:443", i % 200, (i / 200) % 250, i % 250)
                        .parse()
                        .unwrap(),
                    connected_ns: i as u64 * 1000,
                })
            } else {
                ConnChange::Closed
            },
        })
        .collect()
}

fn percentiles(mut ns: Vec<u64>) -> serde_json::Value {
    ns.sort_unstable();
    let at = |p: f64| ns[((ns.len() as f64 * p) as usize).min(ns.len() - 1)];
    serde_json::json!({
        "p50_ns": at(0.50), "p90_ns": at(0.90), "p99_ns": at(0.99),
        "p999_ns": at(0.999), "max_ns": ns[ns.len() - 1],
        "mean_ns": ns.iter().sum::<u64>() as f64 / ns.len() as f64,
    })
}

/// Per-event time of what the event loop does for each event.
fn event_loop(mirror: Option<&Mirror>) -> Vec<u64> {
    let evs = events(EVENTS);
    let mut starts: HashMap<u32, u64> = HashMap::new();
    let mut out = Vec::with_capacity(EVENTS);
    for e in &evs {
        let t = Instant::now();
        if let Some(m) = mirror
            && let Some(op) = conn_op(&mut starts, e)
        {
            m.send(op);
        }
        out.push(t.elapsed().as_nanos() as u64);
    }
    out
}

fn dir() -> tempfile::TempDir {
    // The real disk, not tmpfs, unless asked: the commit's fsync is part of
    // what the mirror thread does alongside the loop.
    let base = std::env::var("KLOAK_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    tempfile::tempdir_in(base).unwrap()
}

fn growth(what: &str, d: &std::path::Path, fill: impl Fn(usize) -> Batch) -> serde_json::Value {
    let (store, _) =
        Store::open(&d.join(format!("{what}.redb")), Key::from_bytes(&[7; 32])).unwrap();
    let before = store.file_bytes();
    let mut i = 0;
    while i < RECORDS {
        store.apply(&fill(i)).unwrap();
        i += PER_BATCH;
    }
    let after = store.file_bytes();
    // Key and value as the tables hold them: DNS keyed by a text key and
    // the record as JSON; connections keyed by (u32, u64, i32).
    let b = fill(0);
    let logical = match what {
        "dns" => {
            let r = &b.dns[0];
            let key = format!(
                "{} {} {} {} {}",
                r.tgid, r.start_time, r.ip, r.name, r.seen_ns
            );
            key.len() + serde_json::to_vec(r).unwrap().len()
        }
        _ => 16 + serde_json::to_vec(&b.conns[0].1).unwrap().len(),
    };
    serde_json::json!({
        "records": RECORDS, "per_commit": PER_BATCH,
        "file_bytes_before": before, "file_bytes_after": after,
        "bytes_per_record": (after - before) as f64 / RECORDS as f64,
        "record_bytes": logical,
    })
}

fn main() {
    let d = dir();
    let baseline = percentiles(event_loop(None));

    let (store, _) = Store::open(&d.path().join("loop.redb"), Key::from_bytes(&[9; 32])).unwrap();
    let m = Mirror::spawn(store);
    let mirrored = percentiles(event_loop(Some(&m)));
    // What the thread made of it once it caught up.
    std::thread::sleep(Duration::from_secs(2));
    let batches = m.stats.batches.load(Ordering::Relaxed);
    let records = m.stats.records.load(Ordering::Relaxed);
    let failures = m.stats.failures.load(Ordering::Relaxed);

    let me = std::process::id();
    let dns = growth("dns", d.path(), |i| Batch {
        dns: (i..i + PER_BATCH)
            .map(|j| DnsRecord {
                tgid: me,
                start_time: 1234,
                ip: format!("10.{}.{}.{}", j % 200, (j / 200) % 250, j % 250),
                name: format!("svc-{j}.namespace.svc.cluster.local"),
                seen_ns: j as u64 * 1_000_000,
                expires_ns: j as u64 * 1_000_000 + 30_000_000_000,
            })
            .collect(),
        ..Batch::default()
    });
    let conns = growth("conns", d.path(), |i| Batch {
        conns: (i..i + PER_BATCH)
            .map(|j| {
                (
                    ConnKey {
                        tgid: me,
                        start_time: 1234,
                        fd: j as i32,
                    },
                    ConnRecord {
                        dest: format!("10.{}.{}.{}:443", j % 200, (j / 200) % 250, j % 250),
                        connected_ns: j as u64 * 1000,
                    },
                )
            })
            .collect(),
        ..Batch::default()
    });

    let out = serde_json::json!({
        "events": EVENTS,
        "event_loop_baseline_no_mirror": baseline,
        "event_loop_with_mirror": mirrored,
        "mirror_batches": batches,
        "mirror_records_committed": records,
        "mirror_failures": failures,
        "file_growth_dns_answer": dns,
        "file_growth_connection": conns,
        "disk": d.path().display().to_string(),
    });
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/mirror.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
