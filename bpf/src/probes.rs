//! Opening, configuring and loading the programs, and attaching the
//! tracepoints that follow processes, sockets and DNS answers.

use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, OpenObject, TracepointCategory};

use crate::{DEFAULT_RING_BYTES, Error, Result, skel, verify_skel};

/// How matched placeholders get their real bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Stop the writing thread; the agent patches its memory and continues it.
    Pause,
    /// The BPF program writes the bytes itself with `bpf_probe_write_user`.
    InPlace,
    /// tc programs patch the encrypted record on the wire; writes the wire
    /// cannot serve are paused.
    Wire,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Pause => "pause",
            Backend::InPlace => "inplace",
            Backend::Wire => "wire",
        }
    }

    /// Whether secret_map entries carry the real value.
    pub fn value_in_kernel(self) -> bool {
        matches!(self, Backend::InPlace | Backend::Wire)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub backend: Backend,
    pub ring_bytes: u32,
    pub scrub: bool,
    /// The agent's own tgid: never stopped, whatever cgroup it sits in.
    pub agent_tgid: u32,
    pub max_secrets: u32,
    /// For each bit alignment, the first three bytes `kloak:` fully covers when
    /// HPACK Huffman-coded; all zero leaves HTTP/2 header values alone.
    pub huffman_signatures: [[u8; 3]; 8],
    /// The cgroup2 root, where the DNS programs see every socket's packets.
    /// None, or a root that refuses them, leaves DNS to the fallback
    /// tracepoints, which read the application's memory.
    pub dns_cgroup: Option<PathBuf>,
    /// The network namespace (inode number of its `/proc/PID/ns/net`) whose
    /// processes the pause fallback may serve secrets with destination rules:
    /// the host's under the node agent, whose pods there cross no veth the
    /// wire could patch on. 0 (`kloak run`): no namespace.
    pub pause_netns: u32,
    /// [`monotonic_ns`] when the agent started loading (0: now): sockets
    /// connected before it are served by pause even for secrets with rules,
    /// their handshake having gone by unseen.
    pub loaded_ns: u64,
    /// Experimental: writes that begin before their key, or with no socket
    /// known (memory BIOs), wait for the wire instead of going to pause.
    pub wire_implicit: bool,
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns()` and of
/// every timestamp the programs report.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::Pause,
            ring_bytes: DEFAULT_RING_BYTES,
            scrub: true,
            agent_tgid: std::process::id(),
            max_secrets: 4096,
            huffman_signatures: [[0; 3]; 8],
            dns_cgroup: None,
            pause_netns: 0,
            loaded_ns: 0,
            wire_implicit: false,
        }
    }
}

/// The loaded programs and maps. Dropping it detaches every probe.
pub struct Probes {
    pub(crate) skel: skel::KloakSkel<'static>,
    pub(crate) backend: Backend,
    pub(crate) scrub: bool,
    tracepoints: Vec<Link>,
    dns_hook: DnsHook,
}

/// Where DNS answers are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsHook {
    /// cgroup_skb egress and ingress on the cgroup2 root: answers from the
    /// packets the kernel received, matched to their socket's query.
    Packets(PathBuf),
    /// `recvfrom`, `recvmsg`, `recvmmsg`, `read`, `readv` syscall
    /// tracepoints, reading payload and source from the application's
    /// memory: a hostile application can forge what they see. Holds why
    /// the packet path is not in use.
    Tracepoints(String),
}

impl DnsHook {
    pub fn describe(&self) -> String {
        match self {
            DnsHook::Packets(root) => format!(
                "packets: cgroup_skb egress/ingress on {} (answers as the kernel received them, matched to the socket's query)",
                root.display()
            ),
            DnsHook::Tracepoints(why) => format!(
                "fallback: syscall tracepoints (recvfrom, recvmsg, recvmmsg, read, readv), reading the application's memory ({why})"
            ),
        }
    }

    /// Whether answers come from kernel state only.
    pub fn kernel_truth(&self) -> bool {
        matches!(self, DnsHook::Packets(_))
    }
}

fn leak_object_storage() -> &'static mut MaybeUninit<OpenObject> {
    // The skeleton borrows its object storage for its whole life. The object
    // itself is freed when the skeleton drops; only this small box is not,
    // and an agent loads its programs once.
    Box::leak(Box::new(MaybeUninit::uninit()))
}

impl Probes {
    /// Opens, configures and loads the programs; attaches the process-following tracepoints.
    pub fn load(cfg: &Config) -> Result<Probes> {
        if cfg.ring_bytes < 4096 || !cfg.ring_bytes.is_power_of_two() {
            return Err(Error::RingSize(cfg.ring_bytes));
        }
        ensure_tracefs()?;
        // The packet path's programs need a kernel that casts their context
        // to the kernel's sk_buff (6.2+); where the verifier refuses them,
        // everything else loads without them and DNS falls back.
        let (skel, mut dns_refused) = match open_and_load(cfg, cfg.dns_cgroup.is_some()) {
            Ok(s) => (s, None),
            Err(e) if cfg.dns_cgroup.is_some() => (open_and_load(cfg, false)?, Some(e.to_string())),
            Err(e) => return Err(e),
        };
        let wire = cfg.backend == Backend::Wire;

        let phase2 = match cfg.backend {
            Backend::InPlace => skel.progs.tls_write_scan_inplace.as_fd(),
            Backend::Pause => skel.progs.tls_write_scan_pause.as_fd(),
            Backend::Wire => skel.progs.tls_write_scan_wire.as_fd(),
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&phase2) as u32;
        skel.maps
            .phase2_progs
            .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "phase2_progs",
                source,
            })?;

        if wire {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&skel.progs.wire_send_prog.as_fd()) as u32;
            skel.maps
                .wire_send_progs
                .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
                .map_err(|source| Error::Map {
                    map: "wire_send_progs",
                    source,
                })?;
        }

        let mut tracepoints = Vec::new();
        for (prog, cat, name) in [
            (
                &skel.progs.on_exec,
                TracepointCategory::Sched,
                "sched_process_exec",
            ),
            (
                &skel.progs.on_exit,
                TracepointCategory::Sched,
                "sched_process_exit",
            ),
            (
                &skel.progs.on_fork,
                TracepointCategory::Sched,
                "sched_process_fork",
            ),
            (
                &skel.progs.on_mmap_enter,
                TracepointCategory::Syscalls,
                "sys_enter_mmap",
            ),
            (
                &skel.progs.on_mmap_exit,
                TracepointCategory::Syscalls,
                "sys_exit_mmap",
            ),
            (
                &skel.progs.on_write_enter,
                TracepointCategory::Syscalls,
                "sys_enter_write",
            ),
            (
                &skel.progs.on_sendto_enter,
                TracepointCategory::Syscalls,
                "sys_enter_sendto",
            ),
            (
                &skel.progs.on_sendmsg_enter,
                TracepointCategory::Syscalls,
                "sys_enter_sendmsg",
            ),
            (
                &skel.progs.on_writev_enter,
                TracepointCategory::Syscalls,
                "sys_enter_writev",
            ),
            (
                &skel.progs.on_connect_enter,
                TracepointCategory::Syscalls,
                "sys_enter_connect",
            ),
            (
                &skel.progs.on_connect_exit,
                TracepointCategory::Syscalls,
                "sys_exit_connect",
            ),
            (
                &skel.progs.on_close,
                TracepointCategory::Syscalls,
                "sys_enter_close",
            ),
        ] {
            let cat_name = cat.as_ref().to_string();
            let link = prog
                .attach_tracepoint(cat, name)
                .map_err(|source| Error::Attach {
                    what: format!("tracepoint {cat_name}/{name}"),
                    source,
                })?;
            tracepoints.push(link);
        }

        if wire {
            let link = skel
                .progs
                .wire_sock_state
                .attach_tracepoint(TracepointCategory::Sock, "inet_sock_set_state")
                .map_err(|source| Error::Attach {
                    what: "tracepoint sock/inet_sock_set_state".into(),
                    source,
                })?;
            tracepoints.push(link);
        }

        // DNS answers: from packets where the cgroup2 root takes the
        // programs, else (and only then) from the receive syscalls.
        let packets = match (&cfg.dns_cgroup, &dns_refused) {
            (None, _) => Err("no cgroup2 hierarchy to attach to".to_string()),
            (Some(_), Some(why)) => Err(why.clone()),
            (Some(root), None) => attach_dns_packets(&skel, root)
                .map(|l| (root, l))
                .map_err(|e| e.to_string()),
        };
        let dns_hook = match packets {
            Ok((root, links)) => {
                tracepoints.extend(links);
                DnsHook::Packets(root.clone())
            }
            Err(why) => {
                dns_refused = Some(why);
                for (prog, cat, name) in [
                    (
                        &skel.progs.on_recvfrom_enter,
                        TracepointCategory::Syscalls,
                        "sys_enter_recvfrom",
                    ),
                    (
                        &skel.progs.on_recvfrom_exit,
                        TracepointCategory::Syscalls,
                        "sys_exit_recvfrom",
                    ),
                    (
                        &skel.progs.on_recvmsg_enter,
                        TracepointCategory::Syscalls,
                        "sys_enter_recvmsg",
                    ),
                    (
                        &skel.progs.on_recvmsg_exit,
                        TracepointCategory::Syscalls,
                        "sys_exit_recvmsg",
                    ),
                    (
                        &skel.progs.on_recvmmsg_enter,
                        TracepointCategory::Syscalls,
                        "sys_enter_recvmmsg",
                    ),
                    (
                        &skel.progs.on_recvmmsg_exit,
                        TracepointCategory::Syscalls,
                        "sys_exit_recvmmsg",
                    ),
                    (
                        &skel.progs.on_readv_enter,
                        TracepointCategory::Syscalls,
                        "sys_enter_readv",
                    ),
                    (
                        &skel.progs.on_readv_exit,
                        TracepointCategory::Syscalls,
                        "sys_exit_readv",
                    ),
                    (
                        &skel.progs.on_read_enter,
                        TracepointCategory::Syscalls,
                        "sys_enter_read",
                    ),
                    (
                        &skel.progs.on_read_exit,
                        TracepointCategory::Syscalls,
                        "sys_exit_read",
                    ),
                ] {
                    let cat_name = cat.as_ref().to_string();
                    let link =
                        prog.attach_tracepoint(cat, name)
                            .map_err(|source| Error::Attach {
                                what: format!("tracepoint {cat_name}/{name}"),
                                source,
                            })?;
                    tracepoints.push(link);
                }
                DnsHook::Tracepoints(dns_refused.take().unwrap_or_default())
            }
        };
        Ok(Probes {
            skel,
            backend: cfg.backend,
            scrub: cfg.scrub,
            tracepoints,
            dns_hook,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn dns_hook(&self) -> DnsHook {
        self.dns_hook.clone()
    }

    /// Number of tracepoints attached for following processes.
    pub fn tracepoint_count(&self) -> usize {
        self.tracepoints.len()
    }
}

/// Opens the object, configures it for `cfg` and loads it; the DNS packet
/// programs go to the verifier only with `dns_packets`.
fn open_and_load(cfg: &Config, dns_packets: bool) -> Result<skel::KloakSkel<'static>> {
    let builder = skel::KloakSkelBuilder::default();
    let mut open = builder.open(leak_object_storage()).map_err(Error::Open)?;
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .expect("kloak.bpf.c has rodata");
    rodata.cfg_scrub = u32::from(cfg.scrub);
    rodata.cfg_agent_tgid = cfg.agent_tgid;
    rodata.cfg_pause_netns = cfg.pause_netns;
    rodata.cfg_loaded_ns = if cfg.loaded_ns != 0 {
        cfg.loaded_ns
    } else {
        monotonic_ns()
    };
    rodata.cfg_huff_sig = cfg.huffman_signatures;
    let wire = cfg.backend == Backend::Wire;
    rodata.cfg_wire = u32::from(wire);
    rodata.cfg_wire_implicit = u32::from(wire && cfg.wire_implicit);
    open.maps
        .tls_events
        .set_max_entries(cfg.ring_bytes)
        .map_err(Error::Open)?;
    open.maps
        .secret_map
        .set_max_entries(cfg.max_secrets)
        .map_err(Error::Open)?;
    let inplace = cfg.backend == Backend::InPlace;
    // Only the chosen backend's programs go to the verifier: a locked-down
    // kernel refuses any program that so much as names bpf_probe_write_user.
    open.progs.tls_write_scan_inplace.set_autoload(inplace);
    open.progs.tls_write_return_inplace.set_autoload(inplace);
    open.progs.tls_write_scan_pause.set_autoload(!inplace);
    open.progs.tls_write_return_pause.set_autoload(!inplace);
    for p in [
        &mut open.progs.tls_write_scan_wire,
        &mut open.progs.kdf_enter,
        &mut open.progs.kdf_exit,
        &mut open.progs.ssl_free_enter,
        &mut open.progs.go_handshake_enter,
        &mut open.progs.go_set_secret,
        &mut open.progs.go_aead,
        &mut open.progs.go_encrypt,
        &mut open.progs.go_close_enter,
        &mut open.progs.wire_out_patch,
        &mut open.progs.wire_in_patch,
        &mut open.progs.wire_out_learn,
        &mut open.progs.wire_in_learn,
        &mut open.progs.wire_sock_state,
        &mut open.progs.wire_send_prog,
    ] {
        p.set_autoload(wire);
    }
    open.progs.dns_egress.set_autoload(dns_packets);
    open.progs.dns_ingress.set_autoload(dns_packets);
    open.load().map_err(Error::Load)
}

/// The DNS programs on the cgroup2 root: every socket's cgroup is below it,
/// so every container's and the command's sockets pass through them.
fn attach_dns_packets(skel: &skel::KloakSkel<'static>, root: &Path) -> Result<Vec<Link>> {
    let dir = std::fs::File::open(root).map_err(|e| Error::Cgroup {
        path: root.to_path_buf(),
        source: e,
    })?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&dir);
    let mut links = Vec::new();
    for (prog, what) in [
        (&skel.progs.dns_egress, "cgroup_skb/egress"),
        (&skel.progs.dns_ingress, "cgroup_skb/ingress"),
    ] {
        links.push(prog.attach_cgroup(fd).map_err(|source| Error::Attach {
            what: format!("{what} on {}", root.display()),
            source,
        })?);
    }
    Ok(links)
}

/// Where tracefs is (or gets) mounted; tracepoint attachment reads event ids there.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs where libbpf looks for it, unless it already is there.
pub fn ensure_tracefs() -> Result<()> {
    let probe = Path::new(TRACEFS).join("events");
    if probe.exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    nix::mount::mount(
        Some("tracefs"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(Error::Tracefs)
}

/// Loads the in-place backend's programs through the verifier, with the
/// write helper swapped for one with the same checks on its source bytes.
/// Proves on a locked-down kernel that the in-place program stays within the
/// verifier's limits. Nothing is attached.
pub fn verify_inplace_programs() -> Result<()> {
    let builder = verify_skel::KloakVerifySkelBuilder::default();
    let mut open = builder.open(leak_object_storage()).map_err(Error::Open)?;
    open.progs.tls_write_scan_pause.set_autoload(false);
    open.progs.tls_write_return_pause.set_autoload(false);
    open.progs.tls_write_scan_inplace.set_autoload(true);
    open.progs.tls_write_return_inplace.set_autoload(true);
    let skel = open.load().map_err(Error::Load)?;
    drop(skel);
    Ok(())
}
