//! Where a process's TCP socket is connected now, as the kernel says.
//!
//! A restored connection record is only as fresh as the last commit: a
//! process that closed the socket and reused the descriptor for another
//! destination inside the window of loss would otherwise inherit the old
//! destination's permission. Every restored record is checked here first.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Finds peers, one process handle per process and, where borrowing a
/// descriptor is refused (an old kernel, a strict Yama), the network
/// namespace's socket table read once.
#[derive(Default)]
pub struct Peers {
    handles: HashMap<u32, Option<kloak_bpf::sys::ProcessHandle>>,
    /// Network namespace (its /proc link) → socket inode → remote address.
    by_netns: HashMap<String, HashMap<u64, SocketAddr>>,
}

impl Peers {
    /// The remote address of `fd` in process `tgid`, if it is a connected
    /// TCP socket.
    pub fn peer(&mut self, tgid: u32, fd: i32) -> Option<SocketAddr> {
        let handle = self
            .handles
            .entry(tgid)
            .or_insert_with(|| kloak_bpf::sys::ProcessHandle::open(tgid).ok());
        match handle.as_ref().map(|h| h.socket_peer(fd)) {
            Some(Ok(peer)) => peer,
            // The process exited, or the descriptor is closed: no socket.
            Some(Err(e)) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EBADF)) => None,
            _ => self.peer_from_table(tgid, fd),
        }
    }

    fn peer_from_table(&mut self, tgid: u32, fd: i32) -> Option<SocketAddr> {
        let link = std::fs::read_link(format!("/proc/{tgid}/fd/{fd}")).ok()?;
        let inode: u64 = link
            .to_str()?
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        let ns = std::fs::read_link(format!("/proc/{tgid}/ns/net"))
            .ok()?
            .display()
            .to_string();
        let table = self.by_netns.entry(ns).or_insert_with(|| {
            let mut t = HashMap::new();
            for f in ["tcp", "tcp6"] {
                if let Ok(text) = std::fs::read_to_string(format!("/proc/{tgid}/net/{f}")) {
                    t.extend(parse_table(&text));
                }
            }
            t
        });
        table.get(&inode).copied()
    }
}

/// Inode → remote address, for every row of /proc/net/tcp or tcp6.
fn parse_table(text: &str) -> impl Iterator<Item = (u64, SocketAddr)> + '_ {
    text.lines().skip(1).filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let remote = parse_addr(f.get(2)?)?;
        let inode = f.get(9)?.parse().ok()?;
        (inode != 0 && remote.port() != 0).then_some((inode, remote))
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the address
/// as the kernel prints it, 32-bit words in host (little-endian) order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_le_bytes(),
        )
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b)).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Same destination, an IPv4-mapped IPv6 address counting as its IPv4 one.
pub fn same_peer(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip().to_canonical() == b.ip().to_canonical() && a.port() == b.port()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn parses_both_families() {
        assert_eq!(
            parse_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        // ::ffff:10.1.2.3 port 443.
        assert_eq!(
            parse_addr("0000000000000000FFFF00000302010A:01BB"),
            Some("10.1.2.3:443".parse().unwrap())
        );
        // ::1 port 53.
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0035"),
            Some("[::1]:53".parse().unwrap())
        );
        assert_eq!(parse_addr("zz:1"), None);
    }

    #[test]
    fn finds_the_peer_of_a_real_socket_and_nothing_for_a_file() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut p = Peers::default();
        let me = std::process::id();
        assert_eq!(p.peer(me, c.as_raw_fd()), Some(l.local_addr().unwrap()));
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(p.peer(me, f.as_raw_fd()), None);
        // A listening socket has no peer.
        assert_eq!(p.peer(me, l.as_raw_fd()), None);
        assert_eq!(p.peer(me, 9999), None);
    }

    #[test]
    fn the_socket_table_gives_the_same_answer() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut p = Peers::default();
        assert_eq!(
            p.peer_from_table(std::process::id(), c.as_raw_fd()),
            Some(l.local_addr().unwrap())
        );
    }
}
