//! The records the programs send through the ring buffers, parsed into
//! plain Rust values, and the reader that polls them.

use std::time::Duration;

use crate::pod::read_pod;
use crate::types::{self, addr_family, conn_kind, event_flag, event_kind};
use crate::{Error, KEY_LEN, MAX_HITS, MAX_SECRET_LEN, PREFIX, Probes, Result, WriteAbi};

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
    /// Wire backend: the hits are armed; tc patches their records on the wire.
    Armed,
    /// Wire backend: the hits' destination is not allowed; they go out unchanged.
    Held,
    /// Wire backend: the records did not carry the hits as expected; they go out unchanged.
    WireMiss,
    /// Wire backend: no decision yet for the write's destination. The writer
    /// is stopped until the agent has decided; nothing is patched in it.
    Decide,
    /// The hits are of require-wire secrets and the wire could not serve
    /// the write: no other backend may, so they went out unchanged.
    RequireWire,
}

impl EventKind {
    pub(crate) fn from_raw(k: u32) -> Option<Self> {
        Some(match event_kind(k) {
            event_kind::EV_REWRITE => EventKind::Rewrite,
            event_kind::EV_SCAN => EventKind::Scan,
            event_kind::EV_SCRUB => EventKind::Scrub,
            event_kind::EV_EXEC => EventKind::Exec,
            event_kind::EV_MMAP => EventKind::Mmap,
            event_kind::EV_REWRITTEN => EventKind::Rewritten,
            event_kind::EV_SCRUBBED => EventKind::Scrubbed,
            event_kind::EV_UNKNOWN => EventKind::Unknown,
            event_kind::EV_EXIT => EventKind::Exit,
            event_kind::EV_SPLIT => EventKind::Split,
            event_kind::EV_ARMED => EventKind::Armed,
            event_kind::EV_HELD => EventKind::Held,
            event_kind::EV_WIRE_MISS => EventKind::WireMiss,
            event_kind::EV_DECIDE => EventKind::Decide,
            event_kind::EV_REQUIRE_WIRE => EventKind::RequireWire,
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
                | EventKind::Decide
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
    /// The process's group (cgroup id, or the container id of a pid-tracked one).
    pub group: u64,
}

impl ConnEvent {
    pub(crate) fn parse(data: &[u8]) -> Option<ConnEvent> {
        let e: types::conn_event = read_pod(data)?;
        let change = match conn_kind(e.kind) {
            conn_kind::CONN_OPEN => ConnChange::Open(Conn {
                dest: std::net::SocketAddr::new(
                    ip_from(e.v.family, &e.v.addr)?,
                    u16::from_be(e.v.port),
                ),
                connected_ns: e.v.ts_ns,
            }),
            conn_kind::CONN_CLOSE => ConnChange::Closed,
            conn_kind::CONN_SSL => ConnChange::Ssl(e.obj),
            _ => return None,
        };
        Some(ConnEvent {
            tgid: e.tgid,
            fd: e.fd,
            change,
            group: e.group,
        })
    }
}

impl DnsEvent {
    pub(crate) fn parse(data: &[u8]) -> Option<DnsEvent> {
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

pub(crate) fn ip_from(family: u16, addr: &[u8; 16]) -> Option<std::net::IpAddr> {
    match addr_family(u32::from(family)) {
        addr_family::AF_INET => Some(std::net::IpAddr::from([addr[0], addr[1], addr[2], addr[3]])),
        addr_family::AF_INET6 => {
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

impl Event {
    pub(crate) fn parse(data: &[u8]) -> Option<Event> {
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
            unreadable: e.flags & event_flag::EVF_UNREADABLE.0 != 0,
            overflow: e.flags & event_flag::EVF_OVERFLOW.0 != 0,
            huffman: e.flags & event_flag::EVF_HUFFMAN.0 != 0,
            comm: String::from_utf8_lossy(&comm_bytes).into_owned(),
            hits,
            unknown,
            fd: (e.fd >= 0).then_some(e.fd),
            split,
        })
    }
}

impl Probes {
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
        // Always, timeout included: records submitted without a wakeup
        // (what the wire armed) never make the ring's fd ready.
        self.drain()?;
        Ok(ready(&fds[1]))
    }

    /// Runs the callback on whatever is queued, without waiting.
    pub fn drain(&self) -> Result<()> {
        self.rb.consume().map_err(Error::Poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
