//! Follows the agent's state into the state file, off the event loop.
//!
//! The agent and the controller send changes down a channel (a send costs
//! the event loop well under a microsecond); one thread commits them in
//! batches of at most `BATCH_WINDOW`. That window is what a SIGKILL can
//! lose: answers and connections younger than it. A full disk turns the
//! mirror off (the agent keeps serving from memory) and says so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kloak_bpf::{ConnChange, ConnEvent};
use kloak_storage::{
    Batch, ConnKey, ConnRecord, DnsRecord, SecretRecord, SslRecord, Store, TrackedRecord,
};

/// How long changes gather before one commit.
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);
const MAX_BATCH: usize = 4096;
/// How often records of processes that are gone are dropped from the file.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

pub enum Op {
    Secret(SecretRecord),
    RemoveSecret(u32),
    Tracked(TrackedRecord),
    Untracked(u64),
    Dns(DnsRecord),
    Conn(ConnKey, ConnRecord),
    Closed(ConnKey),
    Ssl(SslRecord),
}

#[derive(Debug, Default)]
pub struct MirrorStats {
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub failures: AtomicU64,
    /// The disk is full (or the file failed otherwise for good): serving
    /// from memory only.
    pub degraded: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

#[derive(Clone)]
pub struct Mirror {
    tx: mpsc::Sender<Op>,
    pub stats: Arc<MirrorStats>,
}

impl Mirror {
    /// The mirror on a plain thread of its own (benchmarks and tests; the
    /// agent supervises it, see [`Mirror::new`]).
    pub fn spawn(store: Store) -> Mirror {
        let (m, run) = Mirror::new(store);
        std::thread::Builder::new()
            .name("kloak-mirror".into())
            .spawn(run)
            .expect("spawning the mirror thread");
        m
    }

    /// The mirror and the loop that commits its batches, for the caller to
    /// run on a thread. The loop returns once every `Mirror` clone is gone,
    /// after committing what they sent.
    pub fn new(store: Store) -> (Mirror, impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(MirrorStats::default());
        let st = stats.clone();
        (Mirror { tx, stats }, move || run(store, rx, &st))
    }

    pub fn send(&self, op: Op) {
        // A gone mirror thread only means nothing more is persisted.
        let _ = self.tx.send(op);
    }
}

/// Folds one op into the batch. A batch is applied puts first, removals
/// second, so a later put must cancel an earlier removal of the same key: a
/// DNS lookup's UDP socket closed and its descriptor reused at once by the
/// TCP connection that follows, within one commit window, would otherwise
/// lose the live connection (found on a real cluster).
fn add(b: &mut Batch, op: Op) {
    match op {
        Op::Secret(r) => {
            b.removed_secrets.retain(|id| *id != r.id);
            b.secrets.retain(|x| x.id != r.id);
            b.secrets.push(r);
        }
        Op::RemoveSecret(id) => {
            b.secrets.retain(|r| r.id != id);
            b.removed_secrets.push(id);
        }
        Op::Tracked(t) => {
            b.untracked.retain(|id| *id != t.id);
            b.tracked.retain(|x| x.id != t.id);
            b.tracked.push(t);
        }
        Op::Untracked(id) => {
            b.tracked.retain(|t| t.id != id);
            b.untracked.push(id);
        }
        Op::Dns(d) => b.dns.push(d),
        Op::Conn(k, c) => {
            b.closed.retain(|x| *x != k);
            b.conns.retain(|(x, _)| *x != k);
            b.conns.push((k, c));
        }
        Op::Closed(k) => {
            b.conns.retain(|(c, _)| *c != k);
            b.closed.push(k);
        }
        Op::Ssl(r) => b.ssl.push(r),
    }
}

fn run(store: Store, rx: mpsc::Receiver<Op>, stats: &MirrorStats) {
    let mut last_prune = Instant::now();
    loop {
        let first = match rx.recv_timeout(PRUNE_EVERY) {
            Ok(op) => Some(op),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = Batch::default();
        if let Some(op) = first {
            add(&mut batch, op);
            let until = Instant::now() + BATCH_WINDOW;
            while batch.len() < MAX_BATCH {
                let left = until.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(op) => add(&mut batch, op),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        if stats.degraded.load(Ordering::Relaxed) {
            continue;
        }
        if !batch.is_empty() {
            match store.apply(&batch) {
                Ok(()) => {
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                    stats
                        .records
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(e) => fail(stats, &e),
            }
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            if let Err(e) = store.prune_processes(process_alive) {
                fail(stats, &e);
            }
        }
    }
}

fn fail(stats: &MirrorStats, e: &kloak_storage::Error) {
    stats.failures.fetch_add(1, Ordering::Relaxed);
    *stats.last_error.lock().expect("not poisoned") = Some(e.to_string());
    if e.is_disk_full() {
        stats.degraded.store(true, Ordering::Relaxed);
        tracing::error!(error = %e, "the state file's disk is full: serving from memory; a restart will rebuild from the source");
    } else {
        tracing::warn!(error = %e, "writing the state file failed; this batch is not persisted");
    }
}

/// A process's start time, read from /proc once and then remembered.
pub fn cached_start_time(cache: &mut HashMap<u32, u64>, tgid: u32) -> Option<u64> {
    if let Some(&t) = cache.get(&tgid) {
        return Some(t);
    }
    let t = start_time(tgid)?;
    cache.insert(tgid, t);
    Some(t)
}

/// The record one connection event becomes, keyed by the process's
/// identity (pid and start time), so that a reused pid never inherits it.
/// None when the process is already gone.
pub fn conn_op(start_times: &mut HashMap<u32, u64>, c: &ConnEvent) -> Option<Op> {
    let start_time = cached_start_time(start_times, c.tgid)?;
    let key = ConnKey {
        tgid: c.tgid,
        start_time,
        fd: c.fd,
    };
    Some(match c.change {
        ConnChange::Open(conn) => Op::Conn(
            key,
            ConnRecord {
                dest: conn.dest.to_string(),
                connected_ns: conn.connected_ns,
            },
        ),
        ConnChange::Closed => Op::Closed(key),
        ConnChange::Ssl(ptr) => Op::Ssl(SslRecord {
            tgid: c.tgid,
            start_time,
            ptr,
            fd: c.fd,
        }),
    })
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks
/// after boot. With the pid it names a process for good.
pub fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: count fields after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

pub fn process_alive(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_names_this_process() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert!(process_alive(me, t));
        assert!(!process_alive(me, t + 1));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn a_descriptor_closed_and_reconnected_in_one_batch_stays_connected() {
        let k = ConnKey {
            tgid: 7,
            start_time: 1,
            fd: 3,
        };
        let rec = |dest: &str| ConnRecord {
            dest: dest.into(),
            connected_ns: 1,
        };
        let mut b = Batch::default();
        // resolv: UDP socket to the DNS server; then the TCP connection on fd 3.
        add(&mut b, Op::Conn(k, rec("10.96.0.10:53")));
        add(&mut b, Op::Closed(k));
        add(&mut b, Op::Conn(k, rec("10.96.4.2:443")));
        assert!(b.closed.is_empty(), "the later connect cancels the close");
        assert_eq!(b.conns.len(), 1);
        assert_eq!(b.conns[0].1.dest, "10.96.4.2:443");

        let d = tempfile::tempdir().unwrap();
        let key = kloak_storage::Key::from_bytes(&[1; 32]);
        let (store, _) = Store::open(&d.path().join("s.redb"), key).unwrap();
        store.apply(&b).unwrap();
        let conns = store.conns().unwrap();
        assert_eq!(conns.len(), 1, "the live connection is in the file");
        assert_eq!(conns[0].1.dest, "10.96.4.2:443");

        // And the other order still ends closed.
        let mut b = Batch::default();
        add(&mut b, Op::Conn(k, rec("10.96.4.2:443")));
        add(&mut b, Op::Closed(k));
        store.apply(&b).unwrap();
        assert!(store.conns().unwrap().is_empty());
    }

    #[test]
    fn the_thread_commits_batches() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.redb");
        let key = kloak_storage::Key::from_bytes(&[1; 32]);
        let (store, _) = Store::open(&p, key.clone()).unwrap();
        let m = Mirror::spawn(store);
        for i in 0..10 {
            m.send(Op::Dns(DnsRecord {
                tgid: 1,
                start_time: 1,
                ip: "10.0.0.1".into(),
                name: format!("n{i}.test"),
                seen_ns: 1,
                expires_ns: 2,
            }));
        }
        let end = Instant::now() + Duration::from_secs(5);
        while m.stats.records.load(Ordering::Relaxed) < 10 {
            assert!(Instant::now() < end, "not committed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(m.stats.batches.load(Ordering::Relaxed) <= 2, "batched");
    }
}
