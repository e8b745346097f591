//! The data-path loop: read kernel events, patch stopped writers, attach to
//! new TLS libraries, and always continue what was stopped.
//!
//! Invariant: every thread group named by a stop event gets SIGCONT before
//! the batch is done, whether or not its patch succeeded. The patch itself
//! only happens once the whole group is stopped and the ring buffer has been
//! drained again, because SIGCONT also discards the pending stops of threads
//! that hit the probe at the same moment.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kloak_bpf::{
    ConnEvent, DnsEvent, Event, EventKind, Hit, KEY_LEN, MAX_HITS, PREFIX, PREFIX_LEN, Probes,
};
use libbpf_rs::Link;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::discover;
use crate::dns::DnsCache;
use crate::hpack;
use crate::procmem;
use crate::secrets::Secret;

/// How often, at most, the agent looks for files that lost their last user.
const GC_EVERY: Duration = Duration::from_millis(100);

/// Largest buffer the agent reads whole when the kernel could not scan it.
const MAX_USER_SCAN: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Bpf(#[from] kloak_bpf::Error),
}

/// Secrets as the data path needs them: by the id the kernel reports, and by
/// map key for the user-space scan.
#[derive(Default)]
pub struct SecretTable {
    by_id: HashMap<u32, Arc<Secret>>,
    by_key: HashMap<[u8; KEY_LEN], Vec<u32>>,
}

impl SecretTable {
    pub fn new(secrets: impl IntoIterator<Item = Secret>) -> Self {
        let mut t = SecretTable::default();
        for s in secrets {
            t.insert(s);
        }
        t
    }

    /// Adds or replaces the secret with `s.id`; returns the one it replaced.
    fn insert(&mut self, s: Secret) -> Option<Arc<Secret>> {
        let old = self.remove(s.id);
        let key = kloak_bpf::placeholder_key(s.placeholder.as_bytes())
            .expect("minted placeholders have keys");
        self.by_key.entry(key).or_default().push(s.id);
        self.by_id.insert(s.id, Arc::new(s));
        old
    }

    fn remove(&mut self, id: u32) -> Option<Arc<Secret>> {
        let old = self.by_id.remove(&id)?;
        if let Some(key) = kloak_bpf::placeholder_key(old.placeholder.as_bytes())
            && let Some(ids) = self.by_key.get_mut(&key)
        {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.by_key.remove(&key);
            }
        }
        Some(old)
    }

    /// Whose placeholder a write cut short: the one secret whose
    /// placeholder begins with the random characters the write held and is
    /// longer than what it held. None when nothing or more than one fits.
    fn cut_short(&self, t: &kloak_bpf::SplitTail) -> Option<&Arc<Secret>> {
        if t.seen.is_empty() {
            return None;
        }
        let mut fits = self.by_id.values().filter(|s| {
            let p = s.placeholder.as_bytes();
            p.len() > t.len as usize && p[PREFIX_LEN..].starts_with(&t.seen)
        });
        let first = fits.next()?;
        fits.next().is_none().then_some(first)
    }

    /// The secret whose placeholder starts at `bytes[0]`, if any.
    fn match_at(&self, bytes: &[u8]) -> Option<&Arc<Secret>> {
        let rand = bytes.get(PREFIX_LEN..)?;
        for klen in (2..=KEY_LEN.min(rand.len())).rev() {
            let mut key = [0u8; KEY_LEN];
            key[..klen].copy_from_slice(&rand[..klen]);
            for id in self.by_key.get(&key).into_iter().flatten() {
                let s = &self.by_id[id];
                if bytes.starts_with(s.placeholder.as_bytes()) {
                    return Some(s);
                }
            }
        }
        None
    }
}

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
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Bytes rewritten for an HPACK placeholder, kept until the scrub.
struct HuffPatch {
    addr: u64,
    original: Vec<u8>,
    patched: Zeroizing<Vec<u8>>,
}

/// Changes the controller sends to a running agent.
pub enum Command {
    /// Adds a secret, or replaces the one with the same id (rotation).
    PutSecret(Secret),
    RemoveSecret(u32),
    /// Tracks the processes of a container's cgroup; they may receive
    /// exactly `secrets`. Sent again whenever that set changes.
    Track {
        cgroup: std::path::PathBuf,
        id: u64,
        secrets: std::collections::HashSet<u32>,
        /// The cgroup is a v1 directory with no v2 id: track its processes
        /// by pid (the kernel follows their forks); `id` is then the agent's own.
        by_pid: bool,
        /// Pod, namespace and container, for audit spans.
        workload: Option<Workload>,
    },
    Untrack(u64),
    /// What a previous agent knew (from the state file): answers and
    /// connection destinations of processes that still run.
    Restore {
        dns: Vec<kloak_storage::DnsRecord>,
        conns: Vec<(kloak_storage::ConnKey, kloak_storage::ConnRecord)>,
        ssl: Vec<kloak_storage::SslRecord>,
        /// Told how many of each were loaded (their processes still live).
        done: Option<tokio::sync::oneshot::Sender<Restored>>,
    },
    /// Answered once every command sent before it has been applied.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// What a restore loaded into the maps.
#[derive(Debug, Default, Clone, Copy)]
pub struct Restored {
    pub dns_answers: u64,
    pub connections: u64,
    pub tls_objects: u64,
}

enum FileState {
    NotTls,
    Tls(#[allow(dead_code)] Vec<Link>),
}

pub struct Agent<'p> {
    probes: &'p Probes,
    secrets: SecretTable,
    files: HashMap<(u64, u64), FileState>,
    scrub: bool,
    stop_timeout: Duration,
    busy_poll: Duration,
    groups: Groups,
    dns: DnsCache,
    /// cgroup directories of the tracked processes, for finding a file's users.
    cgroups: Vec<std::path::PathBuf>,
    gc_pending: bool,
    last_gc: Instant,
    huffman_scrubs: HashMap<u32, Vec<HuffPatch>>,
    /// Per cgroup id, the secrets its processes may receive; None (kloak
    /// run) means every secret is theirs.
    bindings: Option<HashMap<u64, std::collections::HashSet<u32>>>,
    commands: Option<std::sync::mpsc::Receiver<Command>>,
    /// Written by the controller after each command, so the loop wakes at
    /// once instead of at its next poll timeout.
    wake: Option<Arc<nix::sys::eventfd::EventFd>>,
    /// Container cgroups the controller asked for, by id.
    tracked: HashMap<u64, std::path::PathBuf>,
    /// The pid-tracked ones among them, re-read now and then for processes
    /// that appeared between a read of cgroup.procs and their parent's entry.
    by_pid: HashMap<u64, std::path::PathBuf>,
    last_rescan: Instant,
    guardian: Option<crate::guardian::Guardian>,
    mirror: Option<crate::mirror::Mirror>,
    /// Start times of processes seen, for naming them in the state file.
    start_times: HashMap<u32, u64>,
    /// One span per substitution event, when OTLP export is on.
    audit: Option<kloak_observability::Audit>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Pod, namespace and container of each tracked cgroup (or pid group).
    workloads: HashMap<u64, Arc<Workload>>,
    pub counters: Arc<Counters>,
}

/// Where a tracked cgroup's processes run, for audit spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

#[derive(Debug, PartialEq, Eq)]
enum GroupState {
    Stopped,
    Gone,
    TimedOut,
}

/// How often the agent refreshes the gauges the admin server reports.
const GAUGES_EVERY: Duration = Duration::from_secs(2);

impl<'p> Agent<'p> {
    /// After a batch with stops, poll the ring buffer this long before
    /// sleeping again: the scrub stop and the next request usually follow.
    pub fn with_busy_poll(mut self, d: Duration) -> Self {
        self.busy_poll = d;
        self
    }

    /// The cgroups whose processes are tracked: when one exits, files no
    /// process there maps any more lose their probes.
    pub fn with_cgroups(mut self, dirs: Vec<std::path::PathBuf>) -> Self {
        self.cgroups = dirs;
        self
    }

    /// The cache of trusted DNS answers destination checks consult.
    pub fn with_dns(mut self, dns: DnsCache) -> Self {
        self.dns = dns;
        self
    }

    /// Takes secrets and containers from the controller instead of fixing
    /// them at start; each container's processes get only their pod's secrets.
    pub fn with_commands(
        mut self,
        rx: std::sync::mpsc::Receiver<Command>,
        wake: Arc<nix::sys::eventfd::EventFd>,
        guardian: crate::guardian::Guardian,
    ) -> Self {
        self.commands = Some(rx);
        self.wake = Some(wake);
        self.bindings = Some(HashMap::new());
        self.guardian = Some(guardian);
        self
    }

    pub fn new(probes: &'p Probes, secrets: SecretTable, scrub: bool) -> Self {
        Agent {
            probes,
            secrets,
            files: HashMap::new(),
            scrub,
            stop_timeout: Duration::from_millis(500),
            busy_poll: Duration::ZERO,
            groups: Groups::default(),
            dns: DnsCache::new(Vec::new(), 1024),
            cgroups: Vec::new(),
            gc_pending: false,
            last_gc: Instant::now(),
            huffman_scrubs: HashMap::new(),
            bindings: None,
            commands: None,
            wake: None,
            tracked: HashMap::new(),
            by_pid: HashMap::new(),
            last_rescan: Instant::now(),
            guardian: None,
            mirror: None,
            start_times: HashMap::new(),
            audit: None,
            metrics: Arc::default(),
            workloads: HashMap::new(),
            counters: Arc::default(),
        }
    }

    /// Counts into these (the admin server's) metrics.
    pub fn with_metrics(mut self, m: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = m;
        self
    }

    /// Records a span for every event (see `kloak_observability::audit`).
    pub fn with_audit(mut self, a: kloak_observability::Audit) -> Self {
        self.audit = Some(a);
        self
    }

    /// Hands one event to the span exporter. Never blocks; does nothing
    /// when export is off. Names the secret, never its value.
    fn audit(
        &self,
        e: &Event,
        outcome: kloak_observability::Outcome,
        secret: Option<&Secret>,
        reason: Option<&'static str>,
    ) {
        let library = e.abi.map_or("unknown", |x| x.library());
        let backend = self.probes.backend().as_str();
        self.metrics
            .substitutions
            .get_or_create(&crate::metrics::OutcomeLabels {
                outcome: outcome.as_str(),
                backend,
                library,
            })
            .inc();
        if let Some(r) = reason {
            self.metrics
                .blocked
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: if r.starts_with("destination") {
                        "destination"
                    } else {
                        "not_bound"
                    },
                })
                .inc();
        }
        let Some(a) = &self.audit else { return };
        let now_mono = mono_ns();
        let now = std::time::SystemTime::now();
        let start = now - Duration::from_nanos(now_mono.saturating_sub(e.ts_ns));
        let conn = e.fd.and_then(|fd| self.probes.conn(e.tgid, fd));
        let hostname = conn.and_then(|c| {
            self.dns
                .names_at(e.tgid, c.dest.ip(), c.connected_ns)
                .into_iter()
                .next()
        });
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
            hostname: hostname.map(str::to_string),
            bytes: e.len,
            paused: e
                .kind
                .leaves_stopped()
                .then(|| Duration::from_nanos(now_mono.saturating_sub(e.ts_ns))),
            reason,
        });
    }

    /// Follows DNS answers and connections into the state file.
    pub fn with_mirror(mut self, m: crate::mirror::Mirror) -> Self {
        self.mirror = Some(m);
        self
    }

    fn start_time(&mut self, tgid: u32) -> Option<u64> {
        crate::mirror::cached_start_time(&mut self.start_times, tgid)
    }

    fn mirror_conns(&mut self, events: Vec<ConnEvent>) {
        let Some(m) = &self.mirror else { return };
        for c in &events {
            if let Some(op) = crate::mirror::conn_op(&mut self.start_times, c) {
                m.send(op);
            }
        }
    }

    fn restore(
        &mut self,
        dns: Vec<kloak_storage::DnsRecord>,
        conns: Vec<(kloak_storage::ConnKey, kloak_storage::ConnRecord)>,
        ssl: Vec<kloak_storage::SslRecord>,
    ) -> Restored {
        let (mut answers, mut sockets, mut tls) = (0, 0, 0);
        // Thousands of records name a few processes: look each up once.
        let mut alive_cache: HashMap<(u32, u64), bool> = HashMap::new();
        let mut alive = |tgid: u32, start: u64| {
            *alive_cache
                .entry((tgid, start))
                .or_insert_with(|| crate::mirror::process_alive(tgid, start))
        };
        for r in ssl {
            if alive(r.tgid, r.start_time) && self.probes.put_ssl_fd(r.tgid, r.ptr, r.fd).is_ok() {
                tls += 1;
            }
        }
        for d in dns {
            if alive(d.tgid, d.start_time)
                && let Ok(ip) = d.ip.parse()
            {
                self.dns
                    .restore(d.tgid, ip, d.name, d.seen_ns, d.expires_ns);
                answers += 1;
            }
        }
        let t_conns = Instant::now();
        let mut peers = crate::sockets::Peers::default();
        let mut stale = 0u64;
        for (k, c) in conns {
            let Ok(dest) = c.dest.parse() else { continue };
            if !alive(k.tgid, k.start_time) {
                continue;
            }
            // The descriptor may name another socket by now (closed and
            // reused inside the window of loss): only the kernel's word counts.
            if !peers
                .peer(k.tgid, k.fd)
                .is_some_and(|p| crate::sockets::same_peer(p, dest))
            {
                stale += 1;
                continue;
            }
            if self
                .probes
                .put_conn(
                    k.tgid,
                    k.fd,
                    &kloak_bpf::Conn {
                        dest,
                        connected_ns: c.connected_ns,
                    },
                )
                .is_ok()
            {
                sockets += 1;
            }
        }
        tracing::info!(
            answers,
            sockets,
            stale_sockets = stale,
            tls_objects = tls,
            connections_ms = t_conns.elapsed().as_millis() as u64,
            "DNS answers and connections restored from the state file"
        );
        Restored {
            dns_answers: answers,
            connections: sockets,
            tls_objects: tls,
        }
    }

    /// Applies what the controller sent since the last look.
    fn apply_commands(&mut self) {
        let Some(rx) = &self.commands else {
            return;
        };
        let cmds: Vec<Command> = rx.try_iter().collect();
        let (n, t0) = (cmds.len(), Instant::now());
        if n == 0 {
            return;
        }
        self.apply(cmds);
        tracing::debug!(
            commands = n,
            elapsed_us = t0.elapsed().as_micros() as u64,
            "applied the controller's commands"
        );
    }

    fn apply(&mut self, cmds: Vec<Command>) {
        for c in cmds {
            match c {
                Command::PutSecret(s) => {
                    let entry = kloak_bpf::SecretEntry {
                        id: s.id,
                        placeholder: s.placeholder.as_bytes(),
                        value: Some(s.value.expose()),
                    };
                    if let Err(e) = self.probes.put_secret(&entry) {
                        tracing::warn!(secret = %s.name, error = %e, "adding the secret to secret_map failed; its placeholder goes out unchanged");
                        continue;
                    }
                    let placeholder = s.placeholder.clone();
                    if let Some(old) = self.secrets.insert(s)
                        && old.placeholder != placeholder
                    {
                        let _ = self.probes.remove_secret(old.placeholder.as_bytes());
                    }
                }
                Command::RemoveSecret(id) => {
                    if let Some(old) = self.secrets.remove(id) {
                        let _ = self.probes.remove_secret(old.placeholder.as_bytes());
                    }
                }
                Command::Track {
                    cgroup,
                    id,
                    secrets,
                    by_pid,
                    workload,
                } => {
                    if let Some(w) = workload {
                        self.workloads.insert(id, Arc::new(w));
                    }
                    let new = self
                        .bindings
                        .get_or_insert_with(HashMap::new)
                        .insert(id, secrets)
                        .is_none();
                    if !new {
                        continue;
                    }
                    let Ok(cg) = crate::cgroup::Cgroup::open(&cgroup) else {
                        tracing::warn!(cgroup = %cgroup.display(), "container cgroup vanished before tracking");
                        continue;
                    };
                    // A predecessor that died with its guardian may have left
                    // a process stopped; nothing of ours can be stopped yet.
                    let continued = crate::guardian::sweep(&cg);
                    if continued > 0 {
                        tracing::warn!(cgroup = %cgroup.display(), continued, "continued processes an earlier agent left stopped");
                    }
                    if let Some(g) = &mut self.guardian {
                        g.watch(&cgroup, true);
                    }
                    let r = if by_pid {
                        self.by_pid.insert(id, cgroup.clone());
                        // Twice: a process forked by one not yet in the map
                        // when the first read ran shows up in the second.
                        (0..2).try_for_each(|_| {
                            cg.pids()
                                .into_iter()
                                .try_for_each(|pid| self.probes.track_pid(pid, id))
                        })
                    } else {
                        self.probes.track_cgroup(id)
                    };
                    if let Err(e) = r {
                        tracing::warn!(cgroup = %cgroup.display(), error = %e, "tracking the container failed");
                        continue;
                    }
                    // Processes already running mapped their TLS libraries
                    // before tracking began; later ones stop on exec/mmap.
                    for pid in cg.pids() {
                        self.discover_pid(pid, None);
                    }
                    self.cgroups.push(cgroup.clone());
                    self.tracked.insert(id, cgroup);
                }
                Command::Restore {
                    dns,
                    conns,
                    ssl,
                    done,
                } => {
                    let r = self.restore(dns, conns, ssl);
                    if let Some(d) = done {
                        let _ = d.send(r);
                    }
                }
                Command::Barrier(done) => {
                    let _ = done.send(());
                }
                Command::Untrack(id) => {
                    self.workloads.remove(&id);
                    if self.by_pid.remove(&id).is_some() {
                        self.probes.untrack_pids(id);
                    } else {
                        self.probes.untrack_cgroup(id);
                    }
                    if let Some(b) = &mut self.bindings {
                        b.remove(&id);
                    }
                    if let Some(path) = self.tracked.remove(&id) {
                        if let Some(g) = &mut self.guardian {
                            g.watch(&path, false);
                        }
                        self.cgroups.retain(|p| *p != path);
                    }
                    self.gc_pending = true;
                }
            }
        }
    }

    fn rescan_pid_groups(&mut self) {
        self.last_rescan = Instant::now();
        for (&id, path) in &self.by_pid {
            if let Ok(cg) = crate::cgroup::Cgroup::open(path) {
                for pid in cg.pids() {
                    let _ = self.probes.track_pid(pid, id);
                }
            }
        }
    }

    /// Whether the writer's pod may receive secret `id`.
    fn bound(&self, e: &Event, s: &Secret) -> bool {
        let Some(b) = &self.bindings else {
            return true;
        };
        if b.get(&e.cgroup).is_some_and(|set| set.contains(&s.id)) {
            return true;
        }
        inc(&self.counters.unbound);
        tracing::warn!(
            pid = e.tgid,
            comm = %e.comm,
            secret = %s.name,
            "blocked: this pod does not reference the secret; the placeholder went out unchanged"
        );
        self.audit(
            e,
            kloak_observability::Outcome::Blocked,
            Some(s),
            Some("the pod does not reference this secret"),
        );
        false
    }

    /// Runs until `shutdown` is set, then handles what is still queued.
    pub fn run(&mut self, shutdown: &AtomicBool) -> Result<(), AgentError> {
        let probes = self.probes;
        // Default timer slack (50 us) would stretch every short sleep in
        // wait_group well past the time a group needs to stop.
        let _ = nix::sys::prctl::set_timerslack(1);
        let queue = RefCell::new(Vec::new());
        let dns_queue: RefCell<Vec<DnsEvent>> = RefCell::new(Vec::new());
        let conn_queue: RefCell<Vec<ConnEvent>> = RefCell::new(Vec::new());
        let reader = probes.event_reader(
            |e| queue.borrow_mut().push(e),
            |d| dns_queue.borrow_mut().push(d),
            |c| conn_queue.borrow_mut().push(c),
        )?;
        let mut busy_until = Instant::now();
        let mut last_gauges = Instant::now() - GAUGES_EVERY;
        loop {
            let done = shutdown.load(Ordering::Acquire);
            self.apply_commands();
            if last_gauges.elapsed() >= GAUGES_EVERY {
                last_gauges = Instant::now();
                self.update_gauges();
            }
            if !self.by_pid.is_empty() && self.last_rescan.elapsed() >= Duration::from_secs(1) {
                self.rescan_pid_groups();
            }
            // Right after a stop, the next one (the scrub, the next request)
            // tends to follow within a few hundred microseconds; polling the
            // ring for that long saves the wake-up of a sleeping thread.
            if Instant::now() < busy_until {
                reader.drain()?;
                if queue.borrow().is_empty() {
                    std::thread::yield_now();
                    continue;
                }
            } else if let Some(w) = &self.wake {
                if reader.poll_or_wake(Duration::from_millis(50), std::os::fd::AsFd::as_fd(&**w))? {
                    let _ = w.read();
                }
            } else {
                reader.poll(Duration::from_millis(50))?;
            }
            self.record_dns(dns_queue.take());
            let batch = queue.take();
            for e in &batch {
                tracing::trace!(pid = e.tgid, kind = ?e.kind, hits = e.hits.len(), fd = ?e.fd, "event");
            }
            self.gc_pending |= batch.iter().any(|e| e.kind == EventKind::Exit);
            for e in batch.iter().filter(|e| e.kind == EventKind::Exit) {
                self.start_times.remove(&e.tgid);
            }
            let stops = batch.iter().any(|e| e.kind.leaves_stopped());
            if !batch.is_empty() {
                self.process(batch, &|| {
                    reader.drain()?;
                    Ok((queue.take(), dns_queue.take()))
                })?;
            }
            self.mirror_conns(conn_queue.take());
            if self.gc_pending && self.last_gc.elapsed() >= GC_EVERY {
                self.collect_unused_files();
            }
            if stops && !self.busy_poll.is_zero() {
                busy_until = Instant::now() + self.busy_poll;
            }
            if done {
                return Ok(());
            }
        }
    }

    /// What the metrics read between scrapes: the kernel's lost-event count
    /// and how many processes the tracked containers hold.
    fn update_gauges(&self) {
        self.metrics
            .ring_lost
            .store(self.probes.stats().lost_events, Ordering::Relaxed);
        let procs: usize = self
            .tracked
            .values()
            .filter_map(|cg| std::fs::read_to_string(cg.join("cgroup.procs")).ok())
            .map(|s| s.lines().count())
            .sum();
        self.metrics
            .tracked_processes
            .store(procs as u64, Ordering::Relaxed);
    }

    /// Executable files any tracked process maps now.
    fn files_in_use(&self) -> std::collections::HashSet<(u64, u64)> {
        let mut used = std::collections::HashSet::new();
        for dir in &self.cgroups {
            let Ok(cg) = crate::cgroup::Cgroup::open(dir) else {
                continue;
            };
            for pid in cg.pids() {
                for m in discover::read_maps(pid)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|m| m.exec)
                {
                    used.insert((m.dev, m.ino));
                }
            }
        }
        used
    }

    /// Drops the probes of files no tracked process maps any more. The inode
    /// is forgotten first and the maps read again after, so a process that
    /// maps the file in between either shows up in the second read or stops
    /// on its mapping and gets the file attached anew.
    fn collect_unused_files(&mut self) {
        self.gc_pending = false;
        self.last_gc = Instant::now();
        let used = self.files_in_use();
        let unused: Vec<(u64, u64)> = self
            .files
            .keys()
            .filter(|k| !used.contains(k))
            .copied()
            .collect();
        if unused.is_empty() {
            return;
        }
        for &(dev, ino) in &unused {
            self.probes.forget_inode(dev, ino);
        }
        let used = self.files_in_use();
        for key in unused {
            if used.contains(&key) {
                let _ = self.probes.mark_inode_known(key.0, key.1);
                continue;
            }
            if let Some(FileState::Tls(_)) = self.files.remove(&key) {
                inc(&self.counters.detached_files);
                tracing::info!(
                    dev = key.0,
                    inode = key.1,
                    "last user gone: TLS probes detached"
                );
            }
        }
    }

    fn record_dns(&mut self, answers: Vec<DnsEvent>) {
        for d in answers {
            let before = self.dns.stats;
            let learned = self.dns.record(d.tgid, d.source, d.ts_ns, &d.payload);
            let after = self.dns.stats;
            if self.mirror.is_some()
                && !learned.is_empty()
                && let Some(start_time) = self.start_time(d.tgid)
                && let Some(m) = &self.mirror
            {
                for (ip, name, seen_ns, expires_ns) in learned {
                    m.send(crate::mirror::Op::Dns(kloak_storage::DnsRecord {
                        tgid: d.tgid,
                        start_time,
                        ip: ip.to_string(),
                        name,
                        seen_ns,
                        expires_ns,
                    }));
                }
            }
            if after.untrusted > before.untrusted {
                inc(&self.counters.dns_untrusted);
                tracing::warn!(pid = d.tgid, source = %d.source, "DNS answer from an untrusted source ignored");
            } else if after.answers > before.answers {
                inc(&self.counters.dns_answers);
            }
        }
    }

    fn process(
        &mut self,
        batch: Vec<Event>,
        drain: &dyn Fn() -> Result<(Vec<Event>, Vec<DnsEvent>), kloak_bpf::Error>,
    ) -> Result<(), AgentError> {
        let mut stopped: BTreeMap<u32, Vec<Event>> = BTreeMap::new();
        let counters = self.counters.clone();
        let mut noted: Vec<Event> = Vec::new();
        let sort =
            |evs: Vec<Event>, stopped: &mut BTreeMap<u32, Vec<Event>>, noted: &mut Vec<Event>| {
                for e in evs {
                    if e.kind.leaves_stopped() {
                        stopped.entry(e.tgid).or_default().push(e);
                    } else {
                        note(&counters, &e);
                        noted.push(e);
                    }
                }
            };
        let t0 = mono_ns();
        let first_ts = batch.iter().map(|e| e.ts_ns).min().unwrap_or(t0);
        sort(batch, &mut stopped, &mut noted);
        let mut state: HashMap<u32, GroupState> = HashMap::new();
        loop {
            for &tgid in stopped.keys() {
                state
                    .entry(tgid)
                    .or_insert_with(|| self.groups.wait_stopped(tgid, self.stop_timeout));
            }
            // Threads that hit a probe while the group was stopping have
            // queued their events by now; they must be served before SIGCONT.
            let (more, answers) = drain()?;
            self.record_dns(answers);
            if more.is_empty() {
                break;
            }
            sort(more, &mut stopped, &mut noted);
        }
        let t1 = mono_ns();
        let nstopped = stopped.len();
        for (tgid, events) in stopped {
            match state.get(&tgid) {
                Some(GroupState::Stopped) => {
                    for e in &events {
                        self.handle_stopped(e);
                    }
                }
                Some(GroupState::TimedOut) => {
                    // Patching a running thread could put half a value on
                    // the wire; the placeholder goes out unchanged instead.
                    inc(&self.counters.stop_timeouts);
                    tracing::warn!(
                        pid = tgid,
                        "process did not stop in time; its placeholders go out unchanged"
                    );
                }
                _ => {}
            }
            if kill(Pid::from_raw(tgid as i32), Signal::SIGCONT).is_ok() {
                inc(&self.counters.continued);
            }
            let now = mono_ns();
            for e in &events {
                self.metrics
                    .pause
                    .observe(now.saturating_sub(e.ts_ns) as f64 / 1e9);
            }
        }
        // Counted in the metrics even when no collector is configured.
        for e in &noted {
            self.audit_noted(e);
        }
        if nstopped > 0 {
            let c = &self.counters;
            inc(&c.pause_batches);
            c.wake_ns_total
                .fetch_add(t0.saturating_sub(first_ts), Ordering::Relaxed);
            c.stop_wait_ns_total.fetch_add(t1 - t0, Ordering::Relaxed);
            c.patch_ns_total
                .fetch_add(mono_ns() - t1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Events that left nothing stopped: only counted and logged.
fn note(counters: &Counters, e: &Event) {
    match e.kind {
        EventKind::Unknown => {
            counters
                .unknown_tokens
                .fetch_add(u64::from(e.unknown), Ordering::Relaxed);
            tracing::debug!(pid = e.tgid, comm = %e.comm, tokens = e.unknown, "unknown kloak: token left unchanged");
        }
        EventKind::Split => {
            inc(&counters.splits);
            tracing::debug!(pid = e.tgid, comm = %e.comm, "a write ended inside a kloak: token; it went out unchanged");
        }
        EventKind::Rewritten => {
            counters
                .rewrites
                .fetch_add(e.hits.len() as u64, Ordering::Relaxed);
        }
        EventKind::Scrubbed => {
            counters
                .scrubs
                .fetch_add(e.hits.len() as u64, Ordering::Relaxed);
        }
        _ => {}
    }
}

impl Agent<'_> {
    /// Spans for events the kernel finished alone (the in-place backend's
    /// rewrites and scrubs) and for tokens that name no secret.
    fn audit_noted(&self, e: &Event) {
        use kloak_observability::Outcome;
        let outcome = match e.kind {
            EventKind::Unknown => {
                self.audit(e, Outcome::UnknownPlaceholder, None, None);
                return;
            }
            EventKind::Split => {
                let s = e.split.as_ref().and_then(|t| self.secrets.cut_short(t));
                self.audit(e, Outcome::Split, s.map(|s| &**s), None);
                return;
            }
            EventKind::Rewritten => Outcome::Rewritten,
            EventKind::Scrubbed => Outcome::Scrubbed,
            _ => return,
        };
        for h in &e.hits {
            let s = self.secrets.by_id.get(&h.secret_id).map(|s| &**s);
            self.audit(e, outcome, s, None);
        }
    }

    /// What a user-space scan found that the kernel would have reported
    /// itself: counted, logged and audited the same way.
    fn scan_noted(&self, e: &Event, unknown: u32, split: Option<kloak_bpf::SplitTail>) {
        let unknown = (unknown > 0).then(|| Event {
            kind: EventKind::Unknown,
            unknown,
            ..e.clone()
        });
        let split = split.map(|t| Event {
            kind: EventKind::Split,
            split: Some(t),
            ..e.clone()
        });
        for noted in unknown.into_iter().chain(split) {
            note(&self.counters, &noted);
            self.audit_noted(&noted);
        }
    }

    fn handle_stopped(&mut self, e: &Event) {
        match e.kind {
            EventKind::Rewrite => {
                for h in &e.hits {
                    self.patch(e, h, Direction::ToValue);
                }
            }
            EventKind::Scrub => {
                for h in &e.hits {
                    self.patch(e, h, Direction::ToPlaceholder);
                }
                self.unswap_huffman(e);
            }
            EventKind::Scan => self.user_scan(e),
            EventKind::Exec | EventKind::Mmap => self.discover(e),
            _ => {}
        }
    }

    /// Writes the value (or, scrubbing, the placeholder) at one hit; true if it did.
    fn patch(&self, e: &Event, h: &Hit, dir: Direction) -> bool {
        let Some(s) = self.secrets.by_id.get(&h.secret_id) else {
            return false;
        };
        let (from, to) = match dir {
            Direction::ToValue => (s.placeholder.as_bytes(), s.value.expose()),
            Direction::ToPlaceholder => (s.value.expose(), s.placeholder.as_bytes()),
        };
        if matches!(dir, Direction::ToValue)
            && (!self.bound(e, s) || !self.destination_allowed(e, s))
        {
            return false;
        }
        let addr = e.buf + h.offset;
        // Check the bytes are still what the kernel saw; never write over anything else.
        match procmem::read(e.tgid, addr, from.len()) {
            Ok(cur) if cur == from => {}
            Ok(_) => {
                inc(&self.counters.mismatched);
                return false;
            }
            Err(err) => {
                inc(&self.counters.patch_errors);
                tracing::warn!(pid = e.tgid, secret = %s.name, error = %err, "reading the write buffer failed");
                return false;
            }
        }
        match procmem::write(e.tgid, addr, to) {
            Ok(()) => {
                match dir {
                    Direction::ToValue => {
                        inc(&self.counters.rewrites);
                        tracing::debug!(pid = e.tgid, comm = %e.comm, secret = %s.name, "placeholder rewritten");
                        self.audit(e, kloak_observability::Outcome::Rewritten, Some(s), None);
                    }
                    Direction::ToPlaceholder => {
                        inc(&self.counters.scrubs);
                        self.audit(e, kloak_observability::Outcome::Scrubbed, Some(s), None);
                    }
                }
                true
            }
            Err(err) => {
                inc(&self.counters.patch_errors);
                tracing::warn!(pid = e.tgid, secret = %s.name, error = %err, "patching the write buffer failed");
                false
            }
        }
    }

    /// Whether the socket this write goes to may receive `s`: its destination
    /// from connect(2), named by a trusted DNS answer valid when the
    /// connection was made, checked against the secret's rules. Anything
    /// unknown blocks; a block is counted and logged, never the value.
    fn destination_allowed(&self, e: &Event, s: &Secret) -> bool {
        if s.rules.unrestricted() {
            return true;
        }
        let conn = e.fd.and_then(|fd| self.probes.conn(e.tgid, fd));
        let (dest, names) = match conn {
            Some(c) => (
                Some(c.dest),
                self.dns.names_at(e.tgid, c.dest.ip(), c.connected_ns),
            ),
            None => (None, Vec::new()),
        };
        if let Some(d) = dest
            && s.rules.allows(d, &names)
        {
            return true;
        }
        inc(&self.counters.blocked);
        tracing::warn!(
            pid = e.tgid,
            comm = %e.comm,
            secret = %s.name,
            destination = %dest.map_or_else(|| "unknown".to_string(), |d| d.to_string()),
            verified_names = ?names,
            "blocked: destination not allowed for this secret; the placeholder went out unchanged"
        );
        self.audit(
            e,
            kloak_observability::Outcome::Blocked,
            Some(s),
            Some("destination not allowed for this secret"),
        );
        false
    }

    /// The kernel could not read the buffer (or found more prefixes than it
    /// tracks): scan it here, where reading faults pages in.
    fn user_scan(&mut self, e: &Event) {
        inc(&self.counters.user_scans);
        if e.len > MAX_USER_SCAN {
            tracing::warn!(
                pid = e.tgid,
                len = e.len,
                "write too large to scan; placeholders go out unchanged"
            );
            return;
        }
        let data = match procmem::read(e.tgid, e.buf, e.len as usize) {
            Ok(d) => d,
            Err(err) => {
                inc(&self.counters.patch_errors);
                tracing::warn!(pid = e.tgid, error = %err, "reading the write buffer failed");
                return;
            }
        };
        let mut done: Vec<(Hit, &[u8])> = Vec::new();
        let mut unknown = 0u32;
        let mut split = None;
        let mut i = 0;
        while let Some(pos) = find(&data[i..], PREFIX) {
            let at = i + pos;
            match self.secrets.match_at(&data[at..]) {
                Some(s) => {
                    let h = Hit {
                        offset: at as u64,
                        secret_id: s.id,
                        len: s.placeholder.len() as u32,
                    };
                    if self.patch(e, &h, Direction::ToValue) {
                        done.push((h, s.placeholder.as_bytes()));
                    }
                    i = at + s.placeholder.len();
                }
                None => {
                    match kloak_bpf::SplitTail::find(&data, Some(at)) {
                        Some(t) => split = Some(t),
                        None => unknown += 1,
                    }
                    i = at + PREFIX_LEN;
                }
            }
        }
        let split = split.or_else(|| kloak_bpf::SplitTail::find(&data, None));
        self.scan_noted(e, unknown, split);
        let huffman = if e.huffman {
            self.swap_huffman(e, &data)
        } else {
            Vec::new()
        };
        let scrubbable = e.abi.is_some_and(|a| a.supports_return_probe());
        if self.scrub && scrubbable && !huffman.is_empty() {
            self.huffman_scrubs.insert(e.tid, huffman);
        }
        if self.scrub
            && scrubbable
            && (!done.is_empty() || self.huffman_scrubs.contains_key(&e.tid))
        {
            if done.len() > MAX_HITS {
                tracing::warn!(
                    pid = e.tgid,
                    placeholders = done.len(),
                    "only the first {MAX_HITS} placeholders of this write are scrubbed"
                );
            }
            if let Err(err) = self
                .probes
                .arm_scrub(e.tid, e.buf, &done[..done.len().min(MAX_HITS)])
            {
                tracing::warn!(error = %err, "arming the scrub failed");
            }
        }
    }

    /// HTTP/2: swaps, bit for bit, the Huffman code of every HPACK-safe
    /// placeholder in `data` for the value's, touching only the bytes the
    /// code spans. Returns what was written, for the scrub.
    fn swap_huffman(&self, e: &Event, data: &[u8]) -> Vec<HuffPatch> {
        let mut done = Vec::new();
        for s in self.secrets.by_id.values().filter(|s| s.hpack_safe) {
            let pbits = hpack::bits_of(s.placeholder.as_bytes());
            for at in hpack::find_bits(data, &pbits) {
                if !self.bound(e, s) || !self.destination_allowed(e, s) {
                    continue;
                }
                let (first, end) = (at / 8, (at + pbits.len()).div_ceil(8));
                let original = data[first..end].to_vec();
                let mut patched = Zeroizing::new(original.clone());
                hpack::put_bits(
                    &mut patched,
                    at - first * 8,
                    &hpack::bits_of(s.value.expose()),
                );
                let addr = e.buf + first as u64;
                // As for ASCII: only over the bytes the scan saw.
                if !matches!(procmem::read(e.tgid, addr, original.len()), Ok(cur) if cur == original)
                {
                    inc(&self.counters.mismatched);
                    continue;
                }
                match procmem::write(e.tgid, addr, &patched) {
                    Ok(()) => {
                        inc(&self.counters.rewrites);
                        inc(&self.counters.huffman_rewrites);
                        tracing::debug!(pid = e.tgid, comm = %e.comm, secret = %s.name, "HPACK placeholder rewritten");
                        done.push(HuffPatch {
                            addr,
                            original,
                            patched,
                        });
                    }
                    Err(err) => {
                        inc(&self.counters.patch_errors);
                        tracing::warn!(pid = e.tgid, secret = %s.name, error = %err, "patching the write buffer failed");
                    }
                }
            }
        }
        done
    }

    /// Puts the Huffman-coded placeholders back after the write returned.
    fn unswap_huffman(&mut self, e: &Event) {
        for p in self.huffman_scrubs.remove(&e.tid).unwrap_or_default() {
            match procmem::read(e.tgid, p.addr, p.patched.len()) {
                Ok(cur) if cur[..] == p.patched[..] => {
                    if procmem::write(e.tgid, p.addr, &p.original).is_ok() {
                        inc(&self.counters.scrubs);
                    }
                }
                _ => inc(&self.counters.mismatched),
            }
        }
    }

    /// A tracked process exec'd or mapped a new executable file: attach to
    /// any TLS write function in what it now maps.
    fn discover(&mut self, e: &Event) {
        self.discover_pid(
            e.tgid,
            (e.kind == EventKind::Mmap).then_some((e.dev, e.ino)),
        );
    }

    fn discover_pid(&mut self, tgid: u32, mapped: Option<(u64, u64)>) {
        let maps = match discover::read_maps(tgid) {
            Ok(m) => m,
            Err(err) => {
                tracing::debug!(pid = tgid, error = %err, "process went away before its maps were read");
                return;
            }
        };
        for m in maps.iter().filter(|m| m.exec) {
            let key = (m.dev, m.ino);
            if self.files.contains_key(&key) {
                continue;
            }
            let path = m.open_path(tgid);
            let state = match discover::tls_library(&path) {
                Ok(lib) if lib.is_empty() => FileState::NotTls,
                Ok(lib) => {
                    let fns = &lib.writes;
                    let mut links = Vec::new();
                    match self.probes.attach_socket_hooks(&path, &lib.sockets) {
                        Ok(l) => links.extend(l),
                        Err(err) => {
                            inc(&self.counters.attach_errors);
                            tracing::warn!(file = %m.path, error = %err, "attaching the socket hooks failed; writes through it will be blocked");
                        }
                    }
                    for f in fns {
                        match self
                            .probes
                            .attach_tls_write(&path, f.file_offset as usize, f.abi)
                        {
                            Ok(l) => links.extend(l),
                            Err(err) => {
                                inc(&self.counters.attach_errors);
                                tracing::warn!(file = %m.path, error = %err, "attaching failed");
                            }
                        }
                    }
                    inc(&self.counters.attached_files);
                    tracing::info!(file = %m.path, functions = ?fns.iter().map(|f| f.abi.function()).collect::<Vec<_>>(), "attached to TLS library");
                    FileState::Tls(links)
                }
                Err(err) => {
                    tracing::debug!(file = %m.path, error = %err, "not an ELF we can read");
                    FileState::NotTls
                }
            };
            self.files.insert(key, state);
            let _ = self.probes.mark_inode_known(m.dev, m.ino);
        }
        if let Some((dev, ino)) = mapped {
            // The kernel keyed the file by the inode the fd named; under
            // overlayfs that can differ from the mapping's. Either way, done.
            let _ = self.probes.mark_inode_known(dev, ino);
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    ToValue,
    ToPlaceholder,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Polls of a stopping group that yield the CPU instead of sleeping.
const YIELD_SPINS: u32 = 400;
/// Thread groups whose /proc files stay open between stops.
const MAX_CACHED_GROUPS: usize = 1024;

/// Open /proc stat files of the thread groups the agent stops. Re-reading an
/// open /proc file skips the path walk, and keeping the thread list avoids a
/// directory read per stop; the group's thread count tells when it is stale.
#[derive(Default)]
struct Groups {
    map: HashMap<u32, Group>,
}

struct Group {
    stat: std::fs::File,
    tasks: Vec<(u32, std::fs::File)>,
}

impl Group {
    fn open(tgid: u32) -> Option<Group> {
        let stat = std::fs::File::open(format!("/proc/{tgid}/stat")).ok()?;
        let mut g = Group {
            stat,
            tasks: Vec::new(),
        };
        g.refresh(tgid)?;
        Some(g)
    }

    fn refresh(&mut self, tgid: u32) -> Option<()> {
        let rd = std::fs::read_dir(format!("/proc/{tgid}/task")).ok()?;
        self.tasks = rd
            .filter_map(|d| d.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|t| {
                Some((
                    t,
                    std::fs::File::open(format!("/proc/{tgid}/task/{t}/stat")).ok()?,
                ))
            })
            .collect();
        Some(())
    }
}

fn read_stat<'b>(f: &std::fs::File, buf: &'b mut [u8; 1024]) -> Option<&'b [u8]> {
    let n = std::os::unix::fs::FileExt::read_at(f, buf, 0).ok()?;
    (n > 0).then_some(&buf[..n])
}

/// Field 20 of /proc/PID/stat.
fn num_threads(stat: &[u8]) -> Option<usize> {
    let close = stat.iter().rposition(|&c| c == b')')?;
    std::str::from_utf8(&stat[close + 2..])
        .ok()?
        .split_ascii_whitespace()
        .nth(17)?
        .parse()
        .ok()
}

impl Groups {
    /// Waits until every thread of `tgid` is in group stop.
    fn wait_stopped(&mut self, tgid: u32, timeout: Duration) -> GroupState {
        if self.map.len() > MAX_CACHED_GROUPS {
            self.map.clear();
        }
        let g = match self.map.entry(tgid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match Group::open(tgid) {
                Some(g) => v.insert(g),
                None => return GroupState::Gone,
            },
        };
        let r = wait_group(tgid, g, timeout);
        if r == GroupState::Gone {
            self.map.remove(&tgid);
        }
        r
    }
}

fn wait_group(tgid: u32, g: &mut Group, timeout: Duration) -> GroupState {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1024];
    let mut spins = 0u32;
    loop {
        let mut all_stopped = true;
        let mut live = 0usize;
        let mut stale = false;
        for (_, f) in &g.tasks {
            match read_stat(f, &mut buf).and_then(proc_state) {
                // Gone since the list was made.
                None => stale = true,
                Some(b'Z' | b'X' | b'x') => {}
                Some(b'T') => live += 1,
                Some(_) => {
                    live += 1;
                    all_stopped = false;
                    break;
                }
            }
        }
        if all_stopped {
            // Only zombies left: the process is exiting, nothing to patch.
            if live == 0 && !stale {
                return GroupState::Gone;
            }
            let Some(n) = read_stat(&g.stat, &mut buf).and_then(num_threads) else {
                return GroupState::Gone;
            };
            // Every live thread is one we saw stopped: the whole group is.
            if !stale && n == live {
                return GroupState::Stopped;
            }
            if g.refresh(tgid).is_none() {
                return GroupState::Gone;
            }
        }
        // However the group looks, the wait is bounded: a thread count
        // that never matches (an exiting group) must not hold the agent.
        if Instant::now() > deadline {
            return GroupState::TimedOut;
        }
        if all_stopped {
            continue;
        }
        // The threads we wait for need a CPU to reach their stop; a busy
        // agent on a small node would only delay them. Yield first, then
        // short sleeps, with timer slack at its minimum (set in `run`).
        spins += 1;
        if spins < YIELD_SPINS {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(10));
        }
    }
}

/// The state letter of a /proc stat line; the command name may hold spaces and parentheses.
pub fn proc_state(stat: &[u8]) -> Option<u8> {
    let close = stat.iter().rposition(|&c| c == b')')?;
    stat.get(close + 2).copied()
}

fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("monotonic clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::SecretValue;

    fn secret(id: u32, placeholder: &str) -> Secret {
        Secret {
            id,
            name: format!("s{id}"),
            env: "X".into(),
            value: SecretValue::new(vec![b'v'; placeholder.len()]),
            placeholder: placeholder.into(),
            rules: crate::rules::Rules::default(),
            hpack_safe: false,
        }
    }

    #[test]
    fn match_at_prefers_the_full_placeholder() {
        let t = SecretTable::new([secret(1, "kloak:AB"), secret(2, "kloak:CDEFGHJKMN")]);
        assert_eq!(t.match_at(b"kloak:AB\r\n").unwrap().id, 1);
        assert_eq!(t.match_at(b"kloak:CDEFGHJKMN").unwrap().id, 2);
        assert!(
            t.match_at(b"kloak:CDEFGHJKMX").is_none(),
            "full bytes must match, not just the key"
        );
        assert!(t.match_at(b"kloak:ZZ").is_none());
    }

    #[test]
    fn proc_state_survives_odd_comm() {
        assert_eq!(proc_state(b"12 (a) b) c) T 1 2"), Some(b'T'));
        assert_eq!(proc_state(b"12 (python3) S 1"), Some(b'S'));
    }

    #[test]
    fn group_of_a_missing_process_is_gone() {
        let mut g = Groups::default();
        assert_eq!(
            g.wait_stopped(u32::MAX - 1, Duration::from_millis(10)),
            GroupState::Gone
        );
    }

    #[test]
    fn a_running_group_times_out_and_a_stopped_one_is_seen() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut g = Groups::default();
        assert_eq!(
            g.wait_stopped(pid, Duration::from_millis(20)),
            GroupState::TimedOut
        );
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
        assert_eq!(
            g.wait_stopped(pid, Duration::from_secs(2)),
            GroupState::Stopped
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn num_threads_is_field_20() {
        let stat = b"42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 7 0 123 456";
        assert_eq!(num_threads(stat), Some(7));
    }
}
