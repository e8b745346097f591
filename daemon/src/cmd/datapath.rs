//! The data path as both `kloak run` and `kloak controller` start it: the
//! node checks, the backend, the trusted resolvers, the BPF programs loaded
//! on a thread of their own, and the agent loop on it. The thread exits the
//! process if the loop fails or panics: without its agent, no tracked
//! process may meet another stop, so the kernel must detach every probe
//! (exit does that) while the guardian continues what was already stopped.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use kloak_bpf::{Backend, Config, MapInfo, Probes, SecretEntry, Stats, features};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::datapath::agent::{Agent, Command, Link, Setup};
use crate::datapath::dns::DnsCache;
use crate::datapath::guardian::Guardian;
use crate::datapath::metrics::Metrics;
use crate::datapath::record::Counters;
use crate::datapath::rewrite::SecretTable;
use crate::datapath::secrets::Secret;
use crate::node::doctor;
use crate::state::mirror::Mirror;

/// Exit code for a failure of Kloak itself, as opposed to a command's.
pub const EXIT_INTERNAL: i32 = 70;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Auto,
    Inplace,
    Pause,
    /// Patch the encrypted records on the wire; pause what it cannot serve.
    Wire,
}

/// The data-path flags both commands take (the chart passes them by name).
#[derive(clap::Args, Clone, Debug)]
pub struct DatapathOpts {
    /// Rewrite backend: in-place needs bpf_probe_write_user, pause works
    /// under kernel lockdown, wire patches the encrypted records on their
    /// way out (no stop, the value never enters the application) and pauses
    /// what it cannot serve. In-place cannot enforce bindings or rules.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Size of the tls_events ring buffer in bytes (a power of two).
    #[arg(long, default_value_t = kloak_bpf::DEFAULT_RING_BYTES)]
    pub ring_bytes: u32,
    /// After a stop, poll for the next event this many microseconds
    /// before sleeping: lower latency per placeholder, some CPU. 0 = off.
    #[arg(long, default_value_t = 200)]
    pub busy_poll_us: u64,
    /// A resolver whose answers verify destinations (repeatable). Default:
    /// the nameservers in /etc/resolv.conf. Answers from anywhere else
    /// authorise nothing.
    #[arg(long = "trusted-dns", value_name = "IP")]
    pub trusted_dns: Vec<IpAddr>,
    /// Addresses the DNS cache remembers before evicting the oldest.
    #[arg(long, default_value_t = 1024)]
    pub dns_cache_entries: usize,
    /// Experimental (wire backend): serve on the wire the OpenSSL writes
    /// that begin before their key exists or with no socket known (Node's
    /// memory BIOs), instead of pausing them. Known limits in
    /// docs/architecture.md; off, such writes go to pause.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub wire_implicit_handshakes: bool,
}

impl DatapathOpts {
    /// The resolvers whose answers verify destinations.
    pub fn trusted_resolvers(&self) -> Vec<IpAddr> {
        if self.trusted_dns.is_empty() {
            crate::datapath::dns::resolv_conf_nameservers(std::path::Path::new("/etc/resolv.conf"))
        } else {
            self.trusted_dns.clone()
        }
    }
}

/// Who needs the agent to decide each write, and so rules out the
/// in-place backend (which rewrites in the kernel without asking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decides {
    Nothing,
    /// `kloak run` with secrets that have destination rules.
    Rules,
    /// The node agent: per-pod bindings and rules.
    Bindings,
}

/// Refuses to start on a node that fails a hard requirement, with the
/// doctor's words.
pub fn check_node() -> anyhow::Result<()> {
    let report = doctor::run_checks();
    if let Some(msg) = doctor::refusal(&report) {
        bail!(msg);
    }
    Ok(())
}

/// The one place the backend follows from `--mode` and what must be decided.
pub fn choose_backend(mode: Mode, decides: Decides) -> anyhow::Result<Backend> {
    Ok(match (mode, decides) {
        (Mode::Pause, _) => Backend::Pause,
        (Mode::Wire, _) => Backend::Wire,
        // The in-place backend cannot ask the agent: bindings and rules
        // stay with backends that decide per write (the wire's decisions
        // are the agent's too, written into wire_allow).
        (Mode::Auto, decides) => match doctor::auto_backend() {
            Backend::Wire => Backend::Wire,
            Backend::InPlace if decides == Decides::Nothing => Backend::InPlace,
            _ => Backend::Pause,
        },
        (Mode::Inplace, Decides::Bindings) => bail!(
            "--mode inplace: the in-place backend rewrites in the kernel without asking the agent, so it cannot enforce per-pod bindings or destination rules; the controller uses --mode pause"
        ),
        (Mode::Inplace, decides) => {
            if !features::probe_write_user().unwrap_or(false) {
                bail!(
                    "--mode inplace: this kernel refuses bpf_probe_write_user to uprobe programs (lockdown: {}); use --mode pause or --mode auto",
                    doctor::lockdown().unwrap_or_else(|| "unknown".into())
                );
            }
            if decides == Decides::Rules {
                bail!(
                    "destination rules (hosts, port) are enforced by the pause backend only in this version; use --mode pause, or drop the rules"
                );
            }
            Backend::InPlace
        }
    })
}

/// Where the wire backend's tc programs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireHooks {
    /// Every device of the agent's network namespace (`kloak run`).
    HostDevices,
    /// The host side of every pod's veth, new ones included (the node
    /// agent): where the pod's own `CAP_NET_RAW` cannot see the patch.
    PodVeths,
}

/// What a command asks of the data path beyond the shared flags.
pub struct Spec {
    pub backend: Backend,
    pub scrub: bool,
    /// Entries `secret_map` holds.
    pub max_secrets: u32,
    /// Secrets in the maps before the data path reports ready.
    pub secrets: Vec<Secret>,
    /// A cgroup (id, directory) tracked before ready, every secret allowed
    /// to its processes (`kloak run`'s own).
    pub track: Option<(u64, PathBuf)>,
    /// Per-pod bindings (the node agent).
    pub per_pod: bool,
    /// Where the wire backend patches.
    pub wire_hooks: WireHooks,
    /// The cgroup2 root every tracked socket is below: where DNS answers
    /// are read from packets. None leaves DNS to the syscall fallback.
    pub dns_cgroup: Option<PathBuf>,
    pub guardian: Guardian,
    pub mirror: Option<Mirror>,
    pub audit: Option<kloak_observability::Audit>,
    pub metrics: Arc<Metrics>,
}

/// What the data-path thread leaves when it ends.
pub struct Final {
    pub stats: Stats,
}

/// A running data path.
pub struct Datapath {
    tx: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    shutdown: Arc<AtomicBool>,
    thread: JoinHandle<Option<Final>>,
    pub counters: Arc<Counters>,
    /// The loaded maps, for the admin port's fill gauges.
    pub maps: Vec<MapInfo>,
    pub backend: Backend,
    pub dns_hook: kloak_bpf::DnsHook,
}

impl Datapath {
    /// A sender for commands that wakes the loop after each one.
    pub fn link(&self) -> Link {
        Link::new(self.tx.clone(), self.wake.clone())
    }

    /// Stops the loop after what is queued, detaches every probe, and then
    /// lets the guardian go. Returns the kernel's counters.
    pub fn stop(self) -> Option<Final> {
        self.shutdown.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        self.thread.join().ok().flatten()
    }
}

/// Loads the programs and starts the agent on its own thread; returns once
/// the maps hold `spec.secrets` and `spec.track` is followed.
pub fn start(opts: &DatapathOpts, spec: Spec) -> anyhow::Result<Datapath> {
    // Under the node agent the host's own namespace has no veth to patch
    // on: pause stays the only way to serve secrets with rules there.
    let pause_netns = if spec.backend == Backend::Wire && spec.wire_hooks == WireHooks::PodVeths {
        crate::datapath::veths::host_netns_inode().unwrap_or(0)
    } else {
        0
    };
    let loaded_ns = kloak_bpf::monotonic_ns();
    let wire_rules = crate::datapath::backend::WireRules {
        on: spec.backend == Backend::Wire,
        pause_netns,
        loaded_ns,
    };
    let trusted = opts.trusted_resolvers();
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .context("creating the data path's wake-up eventfd")?,
    );
    let shutdown = Arc::new(AtomicBool::new(false));
    let cfg = Config {
        backend: spec.backend,
        ring_bytes: opts.ring_bytes,
        scrub: spec.scrub,
        agent_tgid: std::process::id(),
        max_secrets: spec.max_secrets,
        huffman_signatures: crate::datapath::hpack::prefix_signatures(),
        dns_cgroup: spec.dns_cgroup.clone(),
        pause_netns,
        loaded_ns,
        wire_implicit: opts.wire_implicit_handshakes,
    };
    type Ready = Result<(Arc<Counters>, Vec<MapInfo>, kloak_bpf::DnsHook), String>;
    let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
    let setup_wake = wake.clone();
    let stop = shutdown.clone();
    let backend = cfg.backend;
    let busy_poll = Duration::from_micros(opts.busy_poll_us);
    let dns_entries = opts.dns_cache_entries;
    let thread = std::thread::Builder::new()
        .name("kloak-datapath".into())
        .spawn(move || {
            let probes = match load(&cfg, &spec) {
                Ok(p) => p,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return None;
                }
            };
            // The wire backend's tc programs, before any write can arm a patch.
            let wire_links = if backend == Backend::Wire && spec.wire_hooks == WireHooks::HostDevices {
                match crate::datapath::wire::attach_host_devices(&probes) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!(
                            "attaching the wire backend's tc programs: {e}"
                        )));
                        return None;
                    }
                }
            } else {
                Vec::new()
            };
            // The pods' veths: hooked by the agent's loop, now and whenever
            // a pod's veth appears.
            let pod_veths = if backend == Backend::Wire && spec.wire_hooks == WireHooks::PodVeths {
                if let Err(e) = crate::datapath::veths::enter_host_netns() {
                    let _ = ready_tx.send(Err(e));
                    return None;
                }
                match crate::datapath::veths::PodVeths::new() {
                    Ok(v) => Some(v),
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!(
                            "listening for the pods' veths (the wire backend patches on their host side): {e}"
                        )));
                        return None;
                    }
                }
            } else {
                None
            };
            let mut agent = Agent::new(
                &probes,
                Setup {
                    secrets: SecretTable::new(spec.secrets),
                    scrub: spec.scrub,
                    busy_poll,
                    dns: DnsCache::new(trusted, dns_entries),
                    per_pod: spec.per_pod,
                    cgroups: spec.track.into_iter().map(|(_, dir)| dir).collect(),
                    guardian: Some(spec.guardian),
                    mirror: spec.mirror,
                    audit: spec.audit,
                    metrics: spec.metrics,
                    commands: rx,
                    pod_veths,
                    wake: setup_wake,
                    wire_rules,
                },
            );
            let _ = ready_tx.send(Ok((agent.counters(), probes.maps(), probes.dns_hook())));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| agent.run(&stop)));
            let msg = match r {
                Ok(Ok(())) => {
                    // The probes go before the guardian: nothing can stop
                    // once they are detached, and the guardian's last sweep
                    // continues anything that stopped before.
                    let guardian = agent.take_guardian();
                    drop(agent);
                    drop(wire_links);
                    let stats = probes.stats();
                    drop(probes);
                    drop(guardian);
                    return Some(Final { stats });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the agent thread panicked".into(),
            };
            eprintln!("kloak: data path failed: {msg}");
            std::process::exit(EXIT_INTERNAL);
        })
        .context("starting the data path thread")?;
    let (counters, maps, dns_hook) = match ready_rx.recv() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => bail!("loading the BPF programs: {e}"),
        Err(_) => bail!("the data path thread died while starting"),
    };
    if !dns_hook.kernel_truth() {
        tracing::warn!(
            dns = %dns_hook.describe(),
            "DNS answers come from the applications' memory here: a hostile application can make a name verify an address of its choosing"
        );
    }
    Ok(Datapath {
        tx,
        wake,
        shutdown,
        thread,
        counters,
        maps,
        backend,
        dns_hook,
    })
}

/// The programs, with the command's first secrets and cgroup in the maps.
fn load(cfg: &Config, spec: &Spec) -> Result<Probes, String> {
    let probes = Probes::load(cfg).map_err(|e| e.to_string())?;
    let wire_rules = crate::datapath::backend::WireRules {
        on: cfg.backend == kloak_bpf::Backend::Wire,
        pause_netns: cfg.pause_netns,
        loaded_ns: cfg.loaded_ns,
    };
    for s in &spec.secrets {
        probes
            .put_secret(&SecretEntry {
                id: s.id,
                placeholder: s.placeholder.as_bytes(),
                // Only the in-place and wire backends' programs need it.
                value: cfg.backend.value_in_kernel().then(|| s.value.expose()),
                require_wire: s.require_wire,
                wire_rules: wire_rules.flags(s),
            })
            .map_err(|e| format!("secret {:?}: {e}", s.name))?;
        // kloak run: no bindings, so a secret without rules needs no
        // decision per destination, and no write waits for one.
        if cfg.backend == kloak_bpf::Backend::Wire && !spec.per_pod && s.rules.unrestricted() {
            probes
                .set_wire_any_destination(s.id)
                .map_err(|e| format!("secret {:?}: {e}", s.name))?;
        }
    }
    if let Some((id, _)) = &spec.track {
        probes.track_cgroup(*id).map_err(|e| e.to_string())?;
    }
    Ok(probes)
}
