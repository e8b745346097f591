//! Kloak's eBPF programs and the safe Rust surface around them.
//!
//! Everything that touches libbpf or raw kernel layouts lives in this crate;
//! callers see [`Probes`], [`Event`] and plain Rust values.

use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use libbpf_rs::TracepointCategory;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, OpenObject, UprobeOpts};

mod skel {
    include!(concat!(env!("OUT_DIR"), "/kloak.skel.rs"));
}
mod verify_skel {
    include!(concat!(env!("OUT_DIR"), "/kloak_verify.skel.rs"));
}

use skel::types;

pub mod sys;

/// Length of the `kloak:` prefix.
pub const PREFIX: &[u8] = b"kloak:";
pub const PREFIX_LEN: usize = 6;
/// Shortest secret value (and so placeholder) Kloak accepts.
pub const MIN_SECRET_LEN: usize = 8;
/// Longest secret value a `secret_map` entry holds.
pub const MAX_SECRET_LEN: usize = 128;
/// Random characters after the prefix that form the map key.
pub const KEY_LEN: usize = 8;
/// Placeholders the kernel handles per write; more go to a user-space scan.
pub const MAX_HITS: usize = 8;
/// Default size of the `tls_events` ring buffer.
pub const DEFAULT_RING_BYTES: u32 = 256 * 1024;

const ABI_SSL_WRITE: u64 = 1;
const ABI_SSL_WRITE_EX: u64 = 2;
const ABI_GO_TLS_WRITE: u64 = 3;
const ABI_GNUTLS_SEND: u64 = 4;
const ABI_RUSTLS_WRITE: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the BPF object: {0}")]
    Open(#[source] libbpf_rs::Error),
    #[error("loading the BPF programs (the kernel verifier refused them): {0}")]
    Load(#[source] libbpf_rs::Error),
    #[error("attaching {what}: {source}")]
    Attach {
        what: String,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("updating BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("ring buffer size {0} is not a power of two of at least 4096 bytes")]
    RingSize(u32),
    #[error("polling the tls_events ring buffer: {0}")]
    Poll(#[source] libbpf_rs::Error),
    #[error("tracefs is not mounted at /sys/kernel/tracing and mounting it failed: {0}")]
    Tracefs(#[source] nix::Error),
    #[error("secret entry is invalid: {0}")]
    Entry(&'static str),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How matched placeholders get their real bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Stop the writing thread; the agent patches its memory and continues it.
    Pause,
    /// The BPF program writes the bytes itself with `bpf_probe_write_user`.
    InPlace,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Pause => "pause",
            Backend::InPlace => "inplace",
        }
    }
}

/// The TLS write function a uprobe sits on; it fixes the argument registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAbi {
    SslWrite,
    SslWriteEx,
    GoTlsWrite,
    /// `gnutls_record_send2` (which `gnutls_record_send` jumps to).
    GnutlsSend,
    /// `<rustls::conn::connection::Writer as std::io::Write>::write`: Rust's
    /// ABI for `(&mut self, &[u8]) -> io::Result<usize>` puts the slice in RSI/RDX.
    RustlsWrite,
}

impl WriteAbi {
    fn cookie(self) -> u64 {
        match self {
            WriteAbi::SslWrite => ABI_SSL_WRITE,
            WriteAbi::SslWriteEx => ABI_SSL_WRITE_EX,
            WriteAbi::GoTlsWrite => ABI_GO_TLS_WRITE,
            WriteAbi::GnutlsSend => ABI_GNUTLS_SEND,
            WriteAbi::RustlsWrite => ABI_RUSTLS_WRITE,
        }
    }

    fn from_cookie(c: u64) -> Option<Self> {
        match c & 0xff {
            ABI_SSL_WRITE => Some(WriteAbi::SslWrite),
            ABI_SSL_WRITE_EX => Some(WriteAbi::SslWriteEx),
            ABI_GO_TLS_WRITE => Some(WriteAbi::GoTlsWrite),
            ABI_GNUTLS_SEND => Some(WriteAbi::GnutlsSend),
            ABI_RUSTLS_WRITE => Some(WriteAbi::RustlsWrite),
            _ => None,
        }
    }

    pub fn function(self) -> &'static str {
        match self {
            WriteAbi::SslWrite => "SSL_write",
            WriteAbi::SslWriteEx => "SSL_write_ex",
            WriteAbi::GoTlsWrite => "crypto/tls.(*Conn).Write",
            WriteAbi::GnutlsSend => "gnutls_record_send",
            WriteAbi::RustlsWrite => "<rustls::conn::connection::Writer as std::io::Write>::write",
        }
    }

    /// The TLS implementation the function belongs to.
    pub fn library(self) -> &'static str {
        match self {
            WriteAbi::SslWrite | WriteAbi::SslWriteEx => "openssl",
            WriteAbi::GoTlsWrite => "go-crypto-tls",
            WriteAbi::GnutlsSend => "gnutls",
            WriteAbi::RustlsWrite => "rustls",
        }
    }

    /// Go moves goroutine stacks, so a uretprobe's return-address trampoline corrupts them.
    pub fn supports_return_probe(self) -> bool {
        !matches!(self, WriteAbi::GoTlsWrite)
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

/// File offsets of the functions that bind an `SSL*` to a socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketHooks {
    /// Functions `(tls object, …, fd)` that bind a socket: `SSL_set_fd`
    /// (Python's `ssl`; fd in RSI), GnuTLS's transport setters (fd in RSI or,
    /// for the two-sided ones, the sending fd in RDX).
    pub fd_setters: Vec<(usize, FdArg)>,
    /// `SSL_set_bio(ssl, rbio, wbio)`, with `BIO_new_socket(fd)` naming the BIO's fd.
    pub set_bio: Option<usize>,
    pub bio_new_socket: Option<usize>,
    /// `SSL_connect`/`SSL_do_handshake`: the thread's first socket write during
    /// them names the fd (curl's own BIO).
    pub handshakes: Vec<usize>,
}

/// Which argument register of an fd setter holds the (sending) fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdArg {
    Rsi,
    Rdx,
}

impl SocketHooks {
    pub fn is_empty(&self) -> bool {
        *self == SocketHooks::default()
    }
}

/// What a map entry holds for one secret.
pub struct SecretEntry<'a> {
    pub id: u32,
    pub placeholder: &'a [u8],
    /// Only given to the kernel for the in-place backend.
    pub value: Option<&'a [u8]>,
}

/// Map key of a placeholder: its random characters after `kloak:`, up to
/// [`KEY_LEN`], zero padded.
pub fn placeholder_key(placeholder: &[u8]) -> Option<[u8; KEY_LEN]> {
    if placeholder.len() < MIN_SECRET_LEN || !placeholder.starts_with(PREFIX) {
        return None;
    }
    let mut k = [0u8; KEY_LEN];
    let rand = &placeholder[PREFIX_LEN..];
    let n = rand.len().min(KEY_LEN);
    k[..n].copy_from_slice(&rand[..n]);
    Some(k)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Rewrite,
    Scan,
    Scrub,
    Exec,
    Mmap,
    Rewritten,
    Scrubbed,
    Unknown,
    Exit,
    /// The write ends inside what looks like a placeholder (see [`SplitTail`]).
    Split,
}

impl EventKind {
    fn from_raw(k: u32) -> Option<Self> {
        Some(match k {
            1 => EventKind::Rewrite,
            2 => EventKind::Scan,
            3 => EventKind::Scrub,
            4 => EventKind::Exec,
            5 => EventKind::Mmap,
            6 => EventKind::Rewritten,
            7 => EventKind::Scrubbed,
            8 => EventKind::Unknown,
            9 => EventKind::Exit,
            10 => EventKind::Split,
            _ => return None,
        })
    }

    /// The writer sits stopped until the agent sends SIGCONT.
    pub fn leaves_stopped(self) -> bool {
        matches!(
            self,
            EventKind::Rewrite
                | EventKind::Scan
                | EventKind::Scrub
                | EventKind::Exec
                | EventKind::Mmap
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub offset: u64,
    pub secret_id: u32,
    pub len: u32,
}

/// Where a write stops in the middle of a placeholder-like token: the
/// placeholder (if it is one) went out in two writes, unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitTail {
    /// Offset of the token in the write buffer.
    pub offset: u64,
    /// Bytes from there to the end of the write.
    pub len: u32,
    /// The random characters after `kloak:` that this write holds (up to
    /// [`KEY_LEN`]): enough for the agent to say whose placeholder it was.
    pub seen: Vec<u8>,
}

impl SplitTail {
    /// What the kernel program reports for a user-space scan's buffer: an
    /// unmatched `kloak:` token at `at` that runs to the end of the write
    /// (its characters in the generator's alphabet), or else a write
    /// ending in `klo`, `kloa` or `kloak`. Shorter endings are too common in
    /// ordinary text to call a split.
    pub fn find(data: &[u8], unmatched_at: Option<usize>) -> Option<SplitTail> {
        if let Some(at) = unmatched_at {
            let tail = data.get(at..)?;
            let rand = tail.strip_prefix(PREFIX)?;
            let seen = &rand[..rand.len().min(KEY_LEN)];
            return (tail.len() < MAX_SECRET_LEN && rand.iter().all(|&c| is_placeholder_char(c)))
                .then(|| SplitTail {
                    offset: at as u64,
                    len: tail.len() as u32,
                    seen: seen.to_vec(),
                });
        }
        let n = [5, 4, 3]
            .into_iter()
            .find(|&n| data.len() >= n && data.ends_with(&PREFIX[..n]))?;
        Some(SplitTail {
            offset: (data.len() - n) as u64,
            len: n as u32,
            seen: Vec::new(),
        })
    }
}

/// What the placeholder generator draws from: Crockford base32, widened
/// for HPACK to letters, digits, `-` and `_`.
fn is_placeholder_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

/// One record from `tls_events`.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub ts_ns: u64,
    pub cgroup: u64,
    pub tgid: u32,
    pub tid: u32,
    pub buf: u64,
    pub len: u64,
    pub abi: Option<WriteAbi>,
    pub dev: u64,
    pub ino: u64,
    pub unreadable: bool,
    pub overflow: bool,
    /// An HPACK Huffman-coded prefix may be in the buffer.
    pub huffman: bool,
    pub comm: String,
    /// Verified placeholders (or, for `Unknown`, the count in `unknown`).
    pub hits: Vec<Hit>,
    pub unknown: u32,
    /// The socket the write goes to, when the SSL*/conn → fd mapping knows it.
    pub fd: Option<i32>,
    /// For `Split` events.
    pub split: Option<SplitTail>,
}

/// A DNS answer a tracked process read: UDP from port 53.
#[derive(Debug, Clone)]
pub struct DnsEvent {
    pub ts_ns: u64,
    pub tgid: u32,
    pub source: std::net::SocketAddr,
    pub payload: Vec<u8>,
}

/// What `conn_events` reports about a tracked process's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnChange {
    /// Connected, to there.
    Open(Conn),
    Closed,
    /// The TLS object at this address writes to the socket.
    Ssl(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnEvent {
    pub tgid: u32,
    pub fd: i32,
    pub change: ConnChange,
}

impl ConnEvent {
    fn parse(data: &[u8]) -> Option<ConnEvent> {
        let e: types::conn_event = read_pod(data)?;
        let change = match e.kind {
            1 => ConnChange::Open(Conn {
                dest: std::net::SocketAddr::new(
                    ip_from(e.v.family, &e.v.addr)?,
                    u16::from_be(e.v.port),
                ),
                connected_ns: e.v.ts_ns,
            }),
            2 => ConnChange::Closed,
            3 => ConnChange::Ssl(e.obj),
            _ => return None,
        };
        Some(ConnEvent {
            tgid: e.tgid,
            fd: e.fd,
            change,
        })
    }
}

impl DnsEvent {
    fn parse(data: &[u8]) -> Option<DnsEvent> {
        let e: types::dns_event = read_pod(data)?;
        let port = u16::from_be(e.port);
        let ip = ip_from(e.family, &e.addr)?;
        let n = (e.len as usize).min(e.payload.len());
        Some(DnsEvent {
            ts_ns: e.ts_ns,
            tgid: e.tgid,
            source: std::net::SocketAddr::new(ip, port),
            payload: e.payload[..n].to_vec(),
        })
    }
}

/// Where a tracked socket was connected to, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub dest: std::net::SocketAddr,
    pub connected_ns: u64,
}

fn ip_from(family: u16, addr: &[u8; 16]) -> Option<std::net::IpAddr> {
    match family {
        2 => Some(std::net::IpAddr::from([addr[0], addr[1], addr[2], addr[3]])),
        10 => {
            let v6 = std::net::Ipv6Addr::from(*addr);
            // A v4-mapped destination is the v4 host.
            Some(
                v6.to_ipv4_mapped()
                    .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            )
        }
        _ => None,
    }
}

/// Copies a plain-old-data record out of a ring-buffer sample.
fn read_pod<T: Copy>(data: &[u8]) -> Option<T> {
    if data.len() < std::mem::size_of::<T>() {
        return None;
    }
    let mut raw = MaybeUninit::<T>::uninit();
    // SAFETY: only used with #[repr(C)] skeleton types generated from the BPF
    // object's BTF (integers and byte arrays, valid for any bit pattern), and
    // `data` holds at least size_of::<T>() bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            raw.as_mut_ptr().cast::<u8>(),
            std::mem::size_of::<T>(),
        );
        Some(raw.assume_init())
    }
}

impl Event {
    fn parse(data: &[u8]) -> Option<Event> {
        let e: types::tls_event = read_pod(data)?;
        let kind = EventKind::from_raw(e.kind)?;
        let comm_bytes: Vec<u8> = e
            .comm
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let split = (kind == EventKind::Split).then(|| {
            let h = &e.hits[0];
            let seen_len = (h.len as usize).saturating_sub(PREFIX.len()).min(KEY_LEN);
            SplitTail {
                offset: u64::from(h.off),
                len: h.len,
                seen: h.key.b[..seen_len].to_vec(),
            }
        });
        let (hits, unknown) = if matches!(kind, EventKind::Unknown | EventKind::Split) {
            (
                Vec::new(),
                if kind == EventKind::Unknown {
                    e.nhits
                } else {
                    0
                },
            )
        } else {
            let n = (e.nhits as usize).min(MAX_HITS);
            let hits = e.hits[..n]
                .iter()
                .map(|h| Hit {
                    offset: u64::from(h.off),
                    secret_id: h.id,
                    len: h.len,
                })
                .collect();
            (hits, 0)
        };
        Some(Event {
            kind,
            ts_ns: e.ts_ns,
            cgroup: e.cgroup,
            tgid: e.tgid,
            tid: e.tid,
            buf: e.buf,
            len: e.len,
            abi: WriteAbi::from_cookie(e.cookie),
            dev: e.dev,
            ino: e.ino,
            unreadable: e.flags & 1 != 0,
            overflow: e.flags & 2 != 0,
            huffman: e.flags & 4 != 0,
            comm: String::from_utf8_lossy(&comm_bytes).into_owned(),
            hits,
            unknown,
            fd: (e.fd >= 0).then_some(e.fd),
            split,
        })
    }
}

/// Counters the programs keep, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub writes: u64,
    pub bytes: u64,
    pub hits: u64,
    pub unknown: u64,
    pub lost_events: u64,
    pub unreadable: u64,
    pub overflow: u64,
    pub tailcall_failures: u64,
    pub stops: u64,
    pub write_failures: u64,
    pub huffman_candidates: u64,
    /// Writes that ended inside a placeholder-like token.
    pub splits: u64,
}

/// A loaded hash map, for its fill metrics.
#[derive(Debug, Clone)]
pub struct MapInfo {
    pub name: String,
    pub id: u32,
    pub capacity: u32,
}

impl MapInfo {
    /// Entries in the map now, by walking its keys (one syscall per key:
    /// call it off the data path).
    pub fn entries(&self) -> Result<u64> {
        let h = libbpf_rs::MapHandle::from_map_id(self.id).map_err(|source| Error::Map {
            map: "map by id",
            source,
        })?;
        Ok(h.keys().count() as u64)
    }
}

/// The loaded programs and maps. Dropping it detaches every probe.
pub struct Probes {
    skel: skel::KloakSkel<'static>,
    backend: Backend,
    scrub: bool,
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
        let skel = open.load().map_err(Error::Load)?;

        let phase2 = if inplace {
            skel.progs.tls_write_scan_inplace.as_fd()
        } else {
            skel.progs.tls_write_scan_pause.as_fd()
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&phase2) as u32;
        skel.maps
            .phase2_progs
            .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "phase2_progs",
                source,
            })?;

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

    pub fn put_secret(&self, e: &SecretEntry<'_>) -> Result<()> {
        let key = placeholder_key(e.placeholder).ok_or(Error::Entry(
            "placeholder lacks the kloak: prefix or is too short",
        ))?;
        if e.placeholder.len() > MAX_SECRET_LEN {
            return Err(Error::Entry("placeholder is longer than a map entry holds"));
        }
        let mut v = types::secret_val {
            len: e.placeholder.len() as u32,
            id: e.id,
            placeholder: [0; MAX_SECRET_LEN],
            value: [0; MAX_SECRET_LEN],
        };
        v.placeholder[..e.placeholder.len()].copy_from_slice(e.placeholder);
        if self.backend == Backend::InPlace {
            let value = e
                .value
                .ok_or(Error::Entry("the in-place backend needs the value"))?;
            if value.len() != e.placeholder.len() {
                return Err(Error::Entry("value and placeholder differ in length"));
            }
            v.value[..value.len()].copy_from_slice(value);
        }
        let bytes = pod_bytes(&v);
        let r = self
            .skel
            .maps
            .secret_map
            .update(&key, bytes, MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "secret_map",
                source,
            });
        // Do not leave a copy of the value in this stack frame.
        v.value.fill(0);
        std::hint::black_box(&v);
        r
    }

    pub fn remove_secret(&self, placeholder: &[u8]) -> Result<()> {
        let key = placeholder_key(placeholder).ok_or(Error::Entry("not a placeholder"))?;
        match self.skel.maps.secret_map.delete(&key) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Map {
                map: "secret_map",
                source,
            }),
        }
    }

    pub fn track_cgroup(&self, cgroup_id: u64) -> Result<()> {
        self.skel
            .maps
            .tracked_cgroups
            .update(&cgroup_id.to_ne_bytes(), &1u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "tracked_cgroups",
                source,
            })
    }

    pub fn untrack_cgroup(&self, cgroup_id: u64) {
        let _ = self
            .skel
            .maps
            .tracked_cgroups
            .delete(&cgroup_id.to_ne_bytes());
    }

    /// Tracks process `pid` (and, from now on, what it forks) as a member
    /// of `group`: for containers with no cgroup v2 id to match.
    pub fn track_pid(&self, pid: u32, group: u64) -> Result<()> {
        self.skel
            .maps
            .tracked_pids
            .update(&pid.to_ne_bytes(), &group.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "tracked_pids",
                source,
            })
    }

    /// The group a pid-tracked process belongs to, if any.
    pub fn pid_group(&self, pid: u32) -> Option<u64> {
        let v = self
            .skel
            .maps
            .tracked_pids
            .lookup(&pid.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()?;
        Some(u64::from_ne_bytes(v.get(..8)?.try_into().ok()?))
    }

    /// Stops tracking every process of `group`.
    pub fn untrack_pids(&self, group: u64) {
        let m = &self.skel.maps.tracked_pids;
        let members: Vec<Vec<u8>> = m
            .keys()
            .filter(|k| {
                m.lookup(k, MapFlags::ANY)
                    .ok()
                    .flatten()
                    .is_some_and(|v| v[..] == group.to_ne_bytes())
            })
            .collect();
        for k in members {
            let _ = m.delete(&k);
        }
    }

    /// Forgets a file, so that the next executable mapping of it stops for a look again.
    pub fn forget_inode(&self, dev: u64, ino: u64) {
        let key = types::inode_key { dev, ino };
        let _ = self.skel.maps.known_inodes.delete(pod_bytes(&key));
    }

    /// Tells the mmap hook that this file needs no look from the agent.
    pub fn mark_inode_known(&self, dev: u64, ino: u64) -> Result<()> {
        let key = types::inode_key { dev, ino };
        self.skel
            .maps
            .known_inodes
            .update(pod_bytes(&key), &[1u8], MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "known_inodes",
                source,
            })
    }

    /// Attaches the write probes (and, where the ABI allows and scrub is on,
    /// the return probe) to `func_offset` in `binary`, for every process;
    /// the programs themselves filter by cgroup.
    pub fn attach_tls_write(
        &self,
        binary: &Path,
        func_offset: usize,
        abi: WriteAbi,
    ) -> Result<Vec<Link>> {
        let what = |ret: bool| {
            format!(
                "{} {} at {}+{:#x}",
                if ret { "uretprobe" } else { "uprobe" },
                abi.function(),
                binary.display(),
                func_offset
            )
        };
        let mut links = Vec::with_capacity(2);
        let opts = UprobeOpts {
            cookie: abi.cookie(),
            retprobe: false,
            ..Default::default()
        };
        links.push(
            self.skel
                .progs
                .tls_write_enter
                .attach_uprobe_with_opts(-1, binary, func_offset, opts)
                .map_err(|source| Error::Attach {
                    what: what(false),
                    source,
                })?,
        );
        if self.scrub && abi.supports_return_probe() {
            let prog = match self.backend {
                Backend::Pause => &self.skel.progs.tls_write_return_pause,
                Backend::InPlace => &self.skel.progs.tls_write_return_inplace,
            };
            let opts = UprobeOpts {
                cookie: abi.cookie(),
                retprobe: true,
                ..Default::default()
            };
            links.push(
                prog.attach_uprobe_with_opts(-1, binary, func_offset, opts)
                    .map_err(|source| Error::Attach {
                        what: what(true),
                        source,
                    })?,
            );
        }
        Ok(links)
    }

    /// The hash maps whose fill the metrics report: name, kernel id and
    /// capacity. Arrays are always full and ring buffers hold bytes, so
    /// they are left out.
    pub fn maps(&self) -> Vec<MapInfo> {
        let m = &self.skel.maps;
        let all: [&dyn MapCore; 14] = [
            &m.secret_map,
            &m.tracked_cgroups,
            &m.tracked_pids,
            &m.known_inodes,
            &m.pending_scrub,
            &m.mmap_args,
            &m.conn_ip_map,
            &m.connect_args,
            &m.ssl_fd,
            &m.hs_ssl,
            &m.recv_args,
            &m.bio_fd,
            &m.bio_args,
            &m.kp_args,
        ];
        all.iter()
            .filter_map(|m| {
                Some(MapInfo {
                    name: m.name().to_string_lossy().into_owned(),
                    id: m.info().ok()?.info.id,
                    capacity: m.max_entries(),
                })
            })
            .collect()
    }

    pub fn stats(&self) -> Stats {
        let mut s = [0u64; 12];
        for (i, slot) in s.iter_mut().enumerate() {
            if let Ok(Some(per_cpu)) = self
                .skel
                .maps
                .stats
                .lookup_percpu(&(i as u32).to_ne_bytes(), MapFlags::ANY)
            {
                *slot = per_cpu
                    .iter()
                    .filter_map(|b| {
                        b.get(..8)
                            .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default()))
                    })
                    .sum();
            }
        }
        Stats {
            writes: s[0],
            bytes: s[1],
            hits: s[2],
            unknown: s[3],
            lost_events: s[4],
            unreadable: s[5],
            overflow: s[6],
            tailcall_failures: s[7],
            stops: s[8],
            write_failures: s[9],
            huffman_candidates: s[10],
            splits: s[11],
        }
    }

    /// A consumer of `tls_events`, `dns_events` and `conn_events`, handing
    /// each parsed record to its callback.
    pub fn event_reader<'a, F, D, C>(
        &'a self,
        mut on_event: F,
        mut on_dns: D,
        mut on_conn: C,
    ) -> Result<EventReader<'a>>
    where
        F: FnMut(Event) + 'a,
        D: FnMut(DnsEvent) + 'a,
        C: FnMut(ConnEvent) + 'a,
    {
        let mut b = libbpf_rs::RingBufferBuilder::new();
        b.add(&self.skel.maps.tls_events, move |data: &[u8]| {
            if let Some(e) = Event::parse(data) {
                on_event(e);
            }
            0
        })
        .map_err(Error::Poll)?;
        b.add(&self.skel.maps.dns_events, move |data: &[u8]| {
            if let Some(e) = DnsEvent::parse(data) {
                on_dns(e);
            }
            0
        })
        .map_err(Error::Poll)?;
        b.add(&self.skel.maps.conn_events, move |data: &[u8]| {
            if let Some(e) = ConnEvent::parse(data) {
                on_conn(e);
            }
            0
        })
        .map_err(Error::Poll)?;
        Ok(EventReader {
            rb: b.build().map_err(Error::Poll)?,
        })
    }

    /// The destination `connect(2)` gave socket `fd` of `tgid`, if tracked.
    pub fn conn(&self, tgid: u32, fd: i32) -> Option<Conn> {
        let key = types::conn_key { tgid, fd };
        let v = self
            .skel
            .maps
            .conn_ip_map
            .lookup(pod_bytes(&key), MapFlags::ANY)
            .ok()??;
        let c: types::conn_val = read_pod(&v)?;
        Some(Conn {
            dest: std::net::SocketAddr::new(ip_from(c.family, &c.addr)?, u16::from_be(c.port)),
            connected_ns: c.ts_ns,
        })
    }

    /// Puts back where socket `fd` of `tgid` was connected (a restarted
    /// agent, from its mirror).
    pub fn put_conn(&self, tgid: u32, fd: i32, c: &Conn) -> Result<()> {
        let key = types::conn_key { tgid, fd };
        let (family, addr) = match c.dest.ip() {
            std::net::IpAddr::V4(v4) => {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&v4.octets());
                (2u16, a)
            }
            std::net::IpAddr::V6(v6) => (10u16, v6.octets()),
        };
        let v = types::conn_val {
            ts_ns: c.connected_ns,
            family,
            port: c.dest.port().to_be(),
            addr,
            ..Default::default()
        };
        self.skel
            .maps
            .conn_ip_map
            .update(pod_bytes(&key), pod_bytes(&v), MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "conn_ip_map",
                source,
            })
    }

    /// Puts back which socket a process's TLS object writes to.
    pub fn put_ssl_fd(&self, tgid: u32, ssl: u64, fd: i32) -> Result<()> {
        let key = types::obj_key {
            tgid,
            _pad: 0,
            ptr: ssl,
        };
        self.skel
            .maps
            .ssl_fd
            .update(pod_bytes(&key), &fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "ssl_fd",
                source,
            })
    }

    /// Attaches the hooks that tell which socket an SSL* writes to.
    pub fn attach_socket_hooks(&self, binary: &Path, hooks: &SocketHooks) -> Result<Vec<Link>> {
        let mut links = Vec::new();
        let attach = |prog: &libbpf_rs::ProgramMut<'_>, off: usize, ret: bool, what: &str| {
            prog.attach_uprobe_with_opts(
                -1,
                binary,
                off,
                UprobeOpts {
                    retprobe: ret,
                    ..Default::default()
                },
            )
            .map_err(|source| Error::Attach {
                what: format!("{what} at {}+{off:#x}", binary.display()),
                source,
            })
        };
        let p = &self.skel.progs;
        for &(off, arg) in &hooks.fd_setters {
            let opts = UprobeOpts {
                cookie: match arg {
                    FdArg::Rsi => 1,
                    FdArg::Rdx => 2,
                },
                ..Default::default()
            };
            links.push(
                p.ssl_set_fd
                    .attach_uprobe_with_opts(-1, binary, off, opts)
                    .map_err(|source| Error::Attach {
                        what: format!("fd setter at {}+{off:#x}", binary.display()),
                        source,
                    })?,
            );
        }
        if let Some(off) = hooks.set_bio {
            links.push(attach(&p.ssl_set_bio, off, false, "SSL_set_bio")?);
        }
        if let Some(off) = hooks.bio_new_socket {
            links.push(attach(
                &p.bio_new_socket_enter,
                off,
                false,
                "BIO_new_socket",
            )?);
            links.push(attach(
                &p.bio_new_socket_exit,
                off,
                true,
                "BIO_new_socket return",
            )?);
        }
        for &off in &hooks.handshakes {
            links.push(attach(&p.ssl_handshake_enter, off, false, "handshake")?);
            links.push(attach(
                &p.ssl_handshake_exit,
                off,
                true,
                "handshake return",
            )?);
        }
        Ok(links)
    }

    /// Arms the scrub for a write the agent patched on its own (after a
    /// user-space scan), so the return probe stops the thread once more.
    pub fn arm_scrub(&self, tid: u32, buf: u64, hits: &[(Hit, &[u8])]) -> Result<()> {
        let mut p = types::pending {
            buf,
            nmatch: hits.len().min(MAX_HITS) as u32,
            _pad: 0,
            r#match: [types::hit::default(); MAX_HITS],
        };
        for (slot, (h, placeholder)) in p.r#match.iter_mut().zip(hits) {
            slot.off = h.offset as u32;
            slot.id = h.secret_id;
            slot.len = h.len;
            slot.key.b = placeholder_key(placeholder).ok_or(Error::Entry("not a placeholder"))?;
        }
        self.skel
            .maps
            .pending_scrub
            .update(&tid.to_ne_bytes(), pod_bytes(&p), MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "pending_scrub",
                source,
            })
    }

    /// Number of tracepoints attached for following processes.
    pub fn tracepoint_count(&self) -> usize {
        self.tracepoints.len()
    }
}

pub struct EventReader<'a> {
    rb: libbpf_rs::RingBuffer<'a>,
}

impl EventReader<'_> {
    /// Waits up to `timeout` for events and runs the callback on each.
    pub fn poll(&self, timeout: Duration) -> Result<()> {
        match self.rb.poll(timeout) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(Error::Poll(e)),
        }
    }

    /// Like [`poll`](Self::poll), but also returns early when `wake`
    /// becomes readable; says whether it did. The caller resets `wake`.
    pub fn poll_or_wake(
        &self,
        timeout: Duration,
        wake: std::os::fd::BorrowedFd<'_>,
    ) -> Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        // SAFETY: the epoll fd belongs to `self.rb`, which outlives this borrow.
        let ep = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.rb.epoll_fd()) };
        let mut fds = [
            PollFd::new(ep, PollFlags::POLLIN),
            PollFd::new(wake, PollFlags::POLLIN),
        ];
        let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, ms) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(false),
            Err(e) => return Err(Error::Poll(libbpf_rs::Error::from_raw_os_error(e as i32))),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| r.intersects(PollFlags::POLLIN));
        if ready(&fds[0]) {
            self.drain()?;
        }
        Ok(ready(&fds[1]))
    }

    /// Runs the callback on whatever is queued, without waiting.
    pub fn drain(&self) -> Result<()> {
        self.rb.consume().map_err(Error::Poll)
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

fn pod_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: only used with #[repr(C)] skeleton types made of integers and
    // byte arrays, whose every byte is initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
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

/// Kernel feature probes for `kloak doctor` and the backend choice.
pub mod features {
    fn helper(
        prog_type: libbpf_sys::bpf_prog_type,
        helper: libbpf_sys::bpf_func_id,
    ) -> Result<bool, i32> {
        // SAFETY: plain FFI call with a null options pointer, which libbpf accepts.
        let r = unsafe { libbpf_sys::libbpf_probe_bpf_helper(prog_type, helper, std::ptr::null()) };
        if r < 0 { Err(r) } else { Ok(r == 1) }
    }

    /// Whether the kernel verifier accepts `bpf_loop` in a uprobe program.
    pub fn bpf_loop() -> Result<bool, i32> {
        helper(libbpf_sys::BPF_PROG_TYPE_KPROBE, libbpf_sys::BPF_FUNC_loop)
    }

    /// Whether a uprobe program may call `bpf_probe_write_user`. Kernel
    /// lockdown refuses it with a message libbpf's generic helper probe
    /// counts as "supported", so this loads a real, valid program instead.
    pub fn probe_write_user() -> Result<bool, i32> {
        const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
            (code as u64)
                | (((dst | (src << 4)) as u64) << 8)
                | ((off as u16 as u64) << 16)
                | ((imm as u32 as u64) << 32)
        }
        let prog: [u64; 8] = [
            insn(0x7a, 10, 0, -8, 0), // *(u64 *)(r10 - 8) = 0
            insn(0xb7, 1, 0, 0, 0),   // r1 = 0 (destination, never called)
            insn(0xbf, 2, 10, 0, 0),  // r2 = r10
            insn(0x07, 2, 0, 0, -8),  // r2 += -8
            insn(0xb7, 3, 0, 0, 8),   // r3 = 8
            insn(0x85, 0, 0, 0, libbpf_sys::BPF_FUNC_probe_write_user as i32),
            insn(0xb7, 0, 0, 0, 0), // r0 = 0
            insn(0x95, 0, 0, 0, 0), // exit
        ];
        let license = c"GPL";
        // SAFETY: `prog` is 8 valid 8-byte instructions laid out as struct
        // bpf_insn; the license string is NUL-terminated; null opts are allowed.
        let fd = unsafe {
            libbpf_sys::bpf_prog_load(
                libbpf_sys::BPF_PROG_TYPE_KPROBE,
                std::ptr::null(),
                license.as_ptr(),
                prog.as_ptr().cast(),
                prog.len() as _,
                std::ptr::null_mut(),
            )
        };
        if fd >= 0 {
            // SAFETY: bpf_prog_load returned a fresh descriptor we own.
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            return Ok(true);
        }
        match -fd {
            libc::EINVAL | libc::EACCES | libc::EPERM => Ok(false),
            e => Err(-e),
        }
    }

    pub fn send_signal_thread() -> Result<bool, i32> {
        helper(
            libbpf_sys::BPF_PROG_TYPE_KPROBE,
            libbpf_sys::BPF_FUNC_send_signal_thread,
        )
    }

    pub fn ringbuf() -> Result<bool, i32> {
        // SAFETY: plain FFI call with a null options pointer.
        let r = unsafe {
            libbpf_sys::libbpf_probe_bpf_map_type(
                libbpf_sys::BPF_MAP_TYPE_RINGBUF,
                std::ptr::null(),
            )
        };
        if r < 0 { Err(r) } else { Ok(r == 1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pads_short_placeholders() {
        assert_eq!(placeholder_key(b"kloak:AB"), Some(*b"AB\0\0\0\0\0\0"));
        assert_eq!(placeholder_key(b"kloak:ABCDEFGHJK"), Some(*b"ABCDEFGH"));
        assert_eq!(placeholder_key(b"kloak:A"), None);
        assert_eq!(placeholder_key(b"cloak:ABCDEFGH"), None);
    }

    #[test]
    fn split_tails_are_told_from_tokens_and_text() {
        let t = SplitTail::find(b"GET /?k=kloak:AB3", Some(8)).unwrap();
        assert_eq!((t.offset, t.len, t.seen.as_slice()), (8, 9, &b"AB3"[..]));
        let t = SplitTail::find(b"x: kloak:0123456789ABC", Some(3)).unwrap();
        assert_eq!(t.seen, b"01234567", "only the key's characters are kept");
        assert!(
            SplitTail::find(b"x: kloak:a.", Some(3)).is_none(),
            "'.' is not in the generator's alphabet"
        );
        assert!(SplitTail::find(b"x: kloak:AB ", Some(3)).is_none());
        assert!(
            SplitTail::find(b"u=kloak:ZZZZZZZZ00000000;", Some(2)).is_none(),
            "a token that ends before the write does was not cut"
        );
        assert!(SplitTail::find(b"x: kloak:a-_Z", Some(3)).is_some());
        let long = [b"kloak:".as_slice(), &[b'A'; 130]].concat();
        assert!(
            SplitTail::find(&long, Some(0)).is_none(),
            "longer than any placeholder"
        );
        assert_eq!(SplitTail::find(b"Bearer kloa", None).unwrap().len, 4);
        assert_eq!(SplitTail::find(b"Bearer kloak", None).unwrap().offset, 7);
        assert!(SplitTail::find(b"blink", None).is_none());
        assert!(SplitTail::find(b"kl", None).is_none());
    }

    #[test]
    fn event_layout_matches_kernel_record() {
        // 7 u64 + 6 u32 + comm + 8 hits of 24 bytes
        assert_eq!(
            std::mem::size_of::<types::tls_event>(),
            56 + 24 + 16 + 8 * 24
        );
    }
}
