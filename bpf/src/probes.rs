//! Opening, configuring and loading the programs, and attaching the
//! tracepoints that follow processes, sockets and DNS answers.

use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::Path;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsHook {
    /// kprobe + kretprobe on `udp_recvmsg` and `udpv6_recvmsg` (the seed's hook).
    Kprobe,
    /// `recvfrom`, `recvmsg`, `recvmmsg`, `read`, `readv` syscall tracepoints.
    Tracepoints,
}

impl DnsHook {
    pub fn as_str(self) -> &'static str {
        match self {
            DnsHook::Kprobe => "kprobe udp_recvmsg/udpv6_recvmsg",
            DnsHook::Tracepoints => {
                "syscall tracepoints (recvfrom, recvmsg, recvmmsg, read, readv)"
            }
        }
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
        let builder = skel::KloakSkelBuilder::default();
        let mut open = builder.open(leak_object_storage()).map_err(Error::Open)?;
        let rodata = open
            .maps
            .rodata_data
            .as_deref_mut()
            .expect("kloak.bpf.c has rodata");
        rodata.cfg_scrub = u32::from(cfg.scrub);
        rodata.cfg_agent_tgid = cfg.agent_tgid;
        rodata.cfg_huff_sig = cfg.huffman_signatures;
        let wire = cfg.backend == Backend::Wire;
        rodata.cfg_wire = u32::from(wire);
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
        let skel = open.load().map_err(Error::Load)?;

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

        // DNS answers: the seed's kprobes on udp_recvmsg/udpv6_recvmsg where
        // the kernel has kprobes, else the receive syscalls' tracepoints.
        // A kernel without kprobes is expected here; libbpf would print its
        // refusal to stderr, so it is silenced for this attempt only.
        let print = libbpf_rs::get_print();
        libbpf_rs::set_print(None);
        let kprobes = (|| -> std::result::Result<Vec<Link>, libbpf_rs::Error> {
            let mut l = Vec::new();
            for f in ["udp_recvmsg", "udpv6_recvmsg"] {
                l.push(skel.progs.kp_udp_recvmsg.attach_kprobe(false, f)?);
                l.push(skel.progs.kp_udp_recvmsg_ret.attach_kprobe(true, f)?);
            }
            Ok(l)
        })();
        libbpf_rs::set_print(print);
        let dns_hook = match kprobes {
            Ok(links) => {
                tracepoints.extend(links);
                DnsHook::Kprobe
            }
            Err(_) => {
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
                DnsHook::Tracepoints
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
        self.dns_hook
    }

    /// Number of tracepoints attached for following processes.
    pub fn tracepoint_count(&self) -> usize {
        self.tracepoints.len()
    }
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
