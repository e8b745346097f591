//! The data-path loop: read kernel events, hand each write to the backend
//! that serves it, apply the controller's commands, and always continue
//! what was stopped. The parts it drives each have one job: the secret
//! table and the rewriter (`rewrite.rs`), the authoriser (`authorise.rs`),
//! the pause backend (`pause.rs`), the attacher (`attach.rs`) and the
//! recorder (`record.rs`).
//!
//! Invariant: every thread group named by a stop event gets SIGCONT before
//! the batch is done, whether or not its patch succeeded. The patch itself
//! only happens once the whole group is stopped and the ring buffer has been
//! drained again, because SIGCONT also discards the pending stops of threads
//! that hit the probe at the same moment. [`Agent::process`] is the one
//! place that keeps this order.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kloak_bpf::{ConnEvent, DnsEvent, Event, EventKind, Probes};
use nix::sys::eventfd::EventFd;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::datapath::attach::Attacher;
use crate::datapath::authorise::Authoriser;
use crate::datapath::backend::{self, BackendKind};
use crate::datapath::dns::DnsCache;
use crate::datapath::guardian::Guardian;
use crate::datapath::metrics::Metrics;
use crate::datapath::pause::{Parts, Pause};
pub use crate::datapath::record::Workload;
use crate::datapath::record::{Counters, Recorder, inc, mono_ns};
pub use crate::datapath::restore::Restored;
use crate::datapath::restore::{Records, restore};
use crate::datapath::rewrite::{ProcMem, SecretTable};
use crate::datapath::secrets::Secret;
use crate::datapath::stops::{GroupState, Groups};
use crate::datapath::veths::PodVeths;
use crate::datapath::wire;
use crate::state::mirror::{self, Mirror};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Bpf(#[from] kloak_bpf::Error),
}

/// Changes the controller sends to a running agent.
pub enum Command {
    /// Adds a secret, or replaces the one with the same id (rotation).
    PutSecret(Secret),
    RemoveSecret(u32),
    /// Tracks the processes of a container's cgroup; they may receive
    /// exactly `secrets`. Sent again whenever that set changes.
    Track {
        cgroup: PathBuf,
        id: u64,
        secrets: HashSet<u32>,
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

/// The controller's way into a running agent: each command wakes the loop.
#[derive(Clone)]
pub struct Link {
    tx: std::sync::mpsc::Sender<Command>,
    wake: Arc<EventFd>,
}

impl Link {
    pub fn new(tx: std::sync::mpsc::Sender<Command>, wake: Arc<EventFd>) -> Self {
        Link { tx, wake }
    }

    pub fn send(&self, c: Command) {
        if self.tx.send(c).is_err() {
            tracing::error!("the data path is gone");
        }
        let _ = self.wake.write(1);
    }
}

/// How the agent is put together; see `cmd::datapath` for who decides.
pub struct Setup {
    pub secrets: SecretTable,
    /// Put placeholders back after each write.
    pub scrub: bool,
    /// After a batch with stops, poll the ring buffer this long before
    /// sleeping again: the scrub stop and the next request usually follow.
    pub busy_poll: Duration,
    pub dns: DnsCache,
    /// Per-pod bindings (node agent): each container gets only its pod's
    /// secrets. Off (`kloak run`): every tracked process gets every secret.
    pub per_pod: bool,
    /// cgroups tracked from the start, for finding a file's users.
    pub cgroups: Vec<PathBuf>,
    pub guardian: Option<Guardian>,
    /// Follows DNS answers and connections into the state file.
    pub mirror: Option<Mirror>,
    /// One span per substitution event, when OTLP export is on.
    pub audit: Option<kloak_observability::Audit>,
    pub metrics: Arc<Metrics>,
    pub commands: std::sync::mpsc::Receiver<Command>,
    /// The node agent's wire hooks on the pods' host-side veths, kept up
    /// to date as pods come and go.
    pub pod_veths: Option<PodVeths<libbpf_rs::Link>>,
    /// Written after each command, so the loop wakes at once instead of at
    /// its next poll timeout.
    pub wake: Arc<EventFd>,
    /// Which secrets only the wire may serve, and where pause still may.
    pub wire_rules: backend::WireRules,
}

pub struct Agent<'p> {
    probes: &'p Probes,
    secrets: SecretTable,
    auth: Authoriser,
    pause: Pause,
    attacher: Attacher,
    rec: Recorder,
    groups: Groups,
    stop_timeout: Duration,
    busy_poll: Duration,
    commands: std::sync::mpsc::Receiver<Command>,
    wake: Arc<EventFd>,
    mirror: Option<Mirror>,
    /// Start times of processes seen, for naming them in the state file.
    start_times: HashMap<u32, u64>,
    /// Where sockets really point, for the wire backend's decisions.
    peers: RefCell<crate::datapath::sockets::Peers>,
    /// Where recently closed sockets went, for the wire's reports, which
    /// the kernel delivers in batches (`lazy_wakeup`), often after the
    /// connection is gone from `conn_ip_map`.
    closed: RecentlyClosed,
    pod_veths: Option<PodVeths<libbpf_rs::Link>>,
    wire_rules: backend::WireRules,
    /// `kloak run` under the wire: writers that could capture their own
    /// patched packets (see `netraw`).
    net_raw: Option<RefCell<crate::datapath::netraw::NetRaw>>,
}

/// The kernel as the wire backend's decisions see it.
struct WireView<'a> {
    probes: &'a Probes,
    peers: &'a RefCell<crate::datapath::sockets::Peers>,
    closed: &'a RecentlyClosed,
}

impl crate::datapath::authorise::Connections for WireView<'_> {
    fn conn(&self, tgid: u32, fd: i32) -> Option<kloak_bpf::Conn> {
        self.probes
            .conn(tgid, fd)
            .or_else(|| self.closed.get(tgid, fd))
    }
}

/// How long a closed socket's destination stays known to late reports.
const CLOSED_KEPT: Duration = Duration::from_secs(5);
/// Bound on what is kept, whatever the rate of closes.
const CLOSED_MAX: usize = 16384;

/// Destinations of the sockets closed in the last [`CLOSED_KEPT`]: what the
/// connect events said when they opened (kernel truth, as `conn_ip_map`).
#[derive(Default)]
struct RecentlyClosed {
    open: RefCell<HashMap<(u32, i32), kloak_bpf::Conn>>,
    closed: RefCell<HashMap<(u32, i32), (kloak_bpf::Conn, Instant)>>,
}

impl RecentlyClosed {
    fn note(&self, c: &ConnEvent) {
        let key = (c.tgid, c.fd);
        match &c.change {
            kloak_bpf::ConnChange::Open(conn) => {
                let mut open = self.open.borrow_mut();
                if open.len() < CLOSED_MAX || open.contains_key(&key) {
                    open.insert(key, *conn);
                }
            }
            kloak_bpf::ConnChange::Closed => {
                if let Some(conn) = self.open.borrow_mut().remove(&key) {
                    let mut closed = self.closed.borrow_mut();
                    if closed.len() >= CLOSED_MAX {
                        let now = Instant::now();
                        closed.retain(|_, (_, at)| now.duration_since(*at) < CLOSED_KEPT);
                    }
                    if closed.len() < CLOSED_MAX {
                        closed.insert(key, (conn, Instant::now()));
                    }
                }
            }
            kloak_bpf::ConnChange::Ssl(_) => {}
        }
    }

    fn get(&self, tgid: u32, fd: i32) -> Option<kloak_bpf::Conn> {
        let closed = self.closed.borrow();
        let (conn, at) = closed.get(&(tgid, fd))?;
        (at.elapsed() < CLOSED_KEPT).then_some(*conn)
    }

    /// A process exited: its sockets closed with it, unseen by close(2)'s
    /// tracepoint. What has aged out goes.
    fn exited(&self, tgid: u32) {
        let now = Instant::now();
        let mut closed = self.closed.borrow_mut();
        closed.retain(|_, (_, at)| now.duration_since(*at) < CLOSED_KEPT);
        self.open.borrow_mut().retain(|&(t, fd), conn| {
            if t == tgid && closed.len() < CLOSED_MAX {
                closed.insert((t, fd), (*conn, now));
            }
            t != tgid
        });
    }
}

impl wire::WireKernel for WireView<'_> {
    fn set_allow(&self, tgid: u32, id: u32, dest: std::net::SocketAddr, allow: bool) {
        if let Err(e) = self.probes.set_wire_allow(tgid, id, dest, allow) {
            tracing::warn!(pid = tgid, error = %e, "wire: recording a decision failed; the placeholder goes out unchanged");
        }
    }

    fn socket_peer(&self, tgid: u32, fd: i32) -> Option<std::net::SocketAddr> {
        self.peers.borrow_mut().peer(tgid, fd)
    }
}

/// How often the agent refreshes the gauges the admin server reports.
const GAUGES_EVERY: Duration = Duration::from_secs(2);

impl<'p> Agent<'p> {
    pub fn new(probes: &'p Probes, s: Setup) -> Self {
        Agent {
            probes,
            secrets: s.secrets,
            auth: Authoriser::new(s.dns, s.per_pod),
            pause: Pause::new(s.scrub),
            attacher: Attacher::new(s.cgroups, s.guardian),
            rec: Recorder::new(s.metrics, s.audit),
            groups: Groups::default(),
            stop_timeout: Duration::from_millis(500),
            busy_poll: s.busy_poll,
            commands: s.commands,
            wake: s.wake,
            mirror: s.mirror,
            start_times: HashMap::new(),
            peers: Default::default(),
            closed: RecentlyClosed::default(),
            pod_veths: s.pod_veths,
            wire_rules: s.wire_rules,
            net_raw: (!s.per_pod && probes.backend() == kloak_bpf::Backend::Wire)
                .then(RefCell::default),
        }
    }

    fn wire_parts(&self) -> (WireView<'_>, &SecretTable, &Authoriser, &Recorder) {
        (
            WireView {
                probes: self.probes,
                peers: &self.peers,
                closed: &self.closed,
            },
            &self.secrets,
            &self.auth,
            &self.rec,
        )
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.rec.counters.clone()
    }

    /// The guardian, handed back so that it outlives the probes.
    pub fn take_guardian(&mut self) -> Option<Guardian> {
        self.attacher.take_guardian()
    }

    fn configured(&self) -> kloak_bpf::Backend {
        self.probes.backend()
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
            // Right after a stop, the next one (the scrub, the next request)
            // tends to follow within a few hundred microseconds; polling the
            // ring for that long saves the wake-up of a sleeping thread.
            if Instant::now() < busy_until {
                reader.drain()?;
                if queue.borrow().is_empty() {
                    std::thread::yield_now();
                    continue;
                }
            } else if reader.poll_or_wake(
                Duration::from_millis(50),
                std::os::fd::AsFd::as_fd(&*self.wake),
            )? {
                let _ = self.wake.read();
            }
            self.record_dns(dns_queue.take());
            // Connections first: the wire's reports arrive in batches
            // (`lazy_wakeup`), and their sockets' opens and closes, read in
            // the same drain, must be known before those reports name a peer.
            self.mirror_conns(conn_queue.take());
            let batch = queue.take();
            for e in &batch {
                tracing::trace!(pid = e.tgid, kind = ?e.kind, hits = e.hits.len(), fd = ?e.fd, "event");
            }
            for e in batch.iter().filter(|e| e.kind == EventKind::Exit) {
                if let Some(n) = &self.net_raw {
                    n.borrow_mut().exited(e.tgid);
                }
                self.attacher.process_exited();
                self.start_times.remove(&e.tgid);
                self.closed.exited(e.tgid);
                if self.configured() == kloak_bpf::Backend::Wire {
                    self.probes.forget_wire_allow(e.tgid);
                }
            }
            let stops = batch.iter().any(|e| e.kind.leaves_stopped());
            if !batch.is_empty() {
                self.process(batch, &|| {
                    reader.drain()?;
                    Ok((queue.take(), dns_queue.take()))
                })?;
            }
            self.mirror_conns(conn_queue.take());
            if let Some(n) = &self.net_raw {
                n.borrow_mut().end_of_batch();
            }
            self.attacher.tick(probes, &self.rec.counters);
            if let Some(v) = &mut self.pod_veths {
                let refused = v.tick(probes);
                let c = &self.rec.counters;
                c.wire_hook_errors
                    .fetch_add(refused.len() as u64, std::sync::atomic::Ordering::Relaxed);
                c.wire_veths
                    .store(v.hooked() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            if stops && !self.busy_poll.is_zero() {
                busy_until = Instant::now() + self.busy_poll;
            }
            if done {
                return Ok(());
            }
        }
    }

    /// One batch: wait for every stopped group, drain again until nothing
    /// more arrives, serve each stopped event, continue every group, then
    /// record what needed no stop.
    fn process(
        &mut self,
        batch: Vec<Event>,
        drain: &dyn Fn() -> Result<(Vec<Event>, Vec<DnsEvent>), kloak_bpf::Error>,
    ) -> Result<(), AgentError> {
        let mut stopped: BTreeMap<u32, Vec<Event>> = BTreeMap::new();
        let mut noted: Vec<Event> = Vec::new();
        let sort =
            |evs: Vec<Event>, stopped: &mut BTreeMap<u32, Vec<Event>>, noted: &mut Vec<Event>| {
                for e in evs {
                    if e.kind.leaves_stopped() {
                        stopped.entry(e.tgid).or_default().push(e);
                    } else {
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
                        self.serve_stopped(e);
                    }
                }
                Some(GroupState::TimedOut) => {
                    // Patching a running thread could put half a value on
                    // the wire; the placeholder goes out unchanged instead.
                    inc(&self.rec.counters.stop_timeouts);
                    tracing::warn!(
                        pid = tgid,
                        "process did not stop in time; its placeholders go out unchanged"
                    );
                }
                _ => {}
            }
            if kill(Pid::from_raw(tgid as i32), Signal::SIGCONT).is_ok() {
                inc(&self.rec.counters.continued);
            }
            let now = mono_ns();
            for e in &events {
                self.rec.paused(e, now);
            }
        }
        // Counted in the metrics even when no collector is configured.
        for e in &noted {
            self.record_noted(e);
        }
        if nstopped > 0 {
            let c = &self.rec.counters;
            inc(&c.pause_batches);
            c.wake_ns_total
                .fetch_add(t0.saturating_sub(first_ts), Ordering::Relaxed);
            c.stop_wait_ns_total.fetch_add(t1 - t0, Ordering::Relaxed);
            c.patch_ns_total
                .fetch_add(mono_ns() - t1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The backend seam: each stopped event goes to the backend that the
    /// kernel's choice for this write names; process events to the attacher.
    fn serve_stopped(&mut self, e: &Event) {
        match backend::serving(self.configured(), e.kind) {
            Some(BackendKind::Pause) => {
                let parts = Parts {
                    secrets: &self.secrets,
                    auth: &self.auth,
                    rec: &self.rec,
                    mem: &ProcMem,
                    kernel: self.probes,
                    wire_rules: self.wire_rules,
                };
                self.pause.serve(&parts, e);
            }
            // In-place events never stop a thread.
            Some(BackendKind::InPlace) => {}
            Some(BackendKind::Wire) => {
                let (kernel, secrets, auth, rec) = self.wire_parts();
                let parts = wire::Parts {
                    secrets,
                    auth,
                    rec,
                    kernel: &kernel,
                };
                wire::decide(&parts, e);
            }
            None => {
                if e.kind == EventKind::Exec
                    && let Some(n) = &self.net_raw
                {
                    n.borrow_mut().exec(e.tgid);
                }
                if matches!(e.kind, EventKind::Exec | EventKind::Mmap) {
                    let mapped = (e.kind == EventKind::Mmap).then_some((e.dev, e.ino));
                    self.attacher
                        .discover_pid(self.probes, &self.rec.counters, e.tgid, mapped);
                }
            }
        }
    }

    /// Events the kernel finished alone (the in-place backend's rewrites
    /// and scrubs) and tokens that name no secret or were cut.
    fn record_noted(&self, e: &Event) {
        let Some(backend) = backend::serving(self.configured(), e.kind) else {
            return;
        };
        if matches!(
            e.kind,
            EventKind::Armed | EventKind::Held | EventKind::WireMiss
        ) {
            if e.kind == EventKind::Armed
                && let Some(n) = &self.net_raw
            {
                n.borrow_mut().armed(e.tgid, &e.comm);
            }
            let (kernel, secrets, auth, rec) = self.wire_parts();
            let parts = wire::Parts {
                secrets,
                auth,
                rec,
                kernel: &kernel,
            };
            wire::record(&parts, e);
            return;
        }
        if e.kind == EventKind::RequireWire {
            let b = crate::datapath::authorise::Blocked {
                reason: crate::datapath::authorise::BlockReason::RequireWire,
                dest: None,
                names: Vec::new(),
            };
            for h in &e.hits {
                if let Some(s) = self.secrets.get(h.secret_id) {
                    self.rec
                        .blocked(e, s, &b, backend, &|| self.auth.peer(e, self.probes));
                }
            }
            return;
        }
        let cut = e
            .split
            .as_ref()
            .and_then(|t| self.secrets.cut_short(t))
            .map(|s| &**s);
        self.rec.noted(
            e,
            backend,
            cut,
            &|id| self.secrets.get(id).cloned(),
            &|| self.auth.peer(e, self.probes),
        );
    }

    /// Applies what the controller sent since the last look.
    fn apply_commands(&mut self) {
        let cmds: Vec<Command> = self.commands.try_iter().collect();
        let (n, t0) = (cmds.len(), Instant::now());
        if n == 0 {
            return;
        }
        for c in cmds {
            self.apply(c);
        }
        tracing::debug!(
            commands = n,
            elapsed_us = t0.elapsed().as_micros() as u64,
            "applied the controller's commands"
        );
    }

    fn apply(&mut self, c: Command) {
        match c {
            Command::PutSecret(s) => {
                let entry = kloak_bpf::SecretEntry {
                    id: s.id,
                    placeholder: s.placeholder.as_bytes(),
                    value: Some(s.value.expose()),
                    require_wire: s.require_wire,
                    wire_rules: self.wire_rules.flags(&s),
                };
                if let Err(e) = self.probes.put_secret(&entry) {
                    tracing::warn!(secret = %s.name, error = %e, "adding the secret to secret_map failed; its placeholder goes out unchanged");
                    return;
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
                    self.rec.set_workload(id, w);
                }
                // Only the binding changes for a group already tracked.
                if self.auth.bind(id, secrets) {
                    self.attacher
                        .track(self.probes, &self.rec.counters, cgroup, id, by_pid);
                }
            }
            Command::Untrack(id) => {
                self.rec.forget_workload(id);
                self.auth.unbind(id);
                self.attacher.untrack(self.probes, id);
            }
            Command::Restore {
                dns,
                conns,
                ssl,
                done,
            } => {
                let r = restore(
                    self.probes,
                    self.auth.dns_mut(),
                    Records { dns, conns, ssl },
                );
                if let Some(d) = done {
                    let _ = d.send(r);
                }
            }
            Command::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }

    /// What the metrics read between scrapes: the kernel's lost-event and
    /// require-wire counts and how many processes the tracked containers hold.
    fn update_gauges(&self) {
        let m = self.rec.metrics();
        let kernel = self.probes.stats();
        m.ring_lost.store(kernel.lost_events, Ordering::Relaxed);
        m.require_wire_unserved
            .store(kernel.require_wire, Ordering::Relaxed);
        m.tracked_processes
            .store(self.attacher.tracked_processes(), Ordering::Relaxed);
    }

    fn mirror_conns(&mut self, events: Vec<ConnEvent>) {
        for c in &events {
            self.closed.note(c);
        }
        if self.configured() == kloak_bpf::Backend::Wire {
            let (kernel, secrets, auth, rec) = self.wire_parts();
            let parts = wire::Parts {
                secrets,
                auth,
                rec,
                kernel: &kernel,
            };
            for c in &events {
                if matches!(c.change, kloak_bpf::ConnChange::Open(_)) {
                    wire::connected(&parts, c.tgid, c.fd, c.group);
                }
            }
        }
        let Some(m) = &self.mirror else { return };
        for c in &events {
            if let Some(op) = mirror::conn_op(&mut self.start_times, c) {
                m.send(op);
            }
        }
    }

    fn record_dns(&mut self, answers: Vec<DnsEvent>) {
        for d in answers {
            let dns = self.auth.dns_mut();
            let before = dns.stats;
            let learned = dns.record(d.tgid, d.source, d.ts_ns, &d.payload);
            let after = dns.stats;
            if self.mirror.is_some()
                && !learned.is_empty()
                && let Some(start_time) = mirror::cached_start_time(&mut self.start_times, d.tgid)
                && let Some(m) = &self.mirror
            {
                for (ip, name, seen_ns, expires_ns) in learned {
                    m.send(mirror::Op::Dns(kloak_storage::DnsRecord {
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
                inc(&self.rec.counters.dns_untrusted);
                tracing::warn!(pid = d.tgid, source = %d.source, "DNS answer from an untrusted source ignored");
            } else if after.answers > before.answers {
                inc(&self.rec.counters.dns_answers);
            }
        }
    }
}
