//! Whether one write may receive one secret's value: the writer's pod must
//! reference the secret (per-pod bindings, node agent only), and the socket
//! the write goes to must be a destination the secret's rules allow, named
//! by a trusted DNS answer to the writer itself that was valid when the
//! connection was made. Every input is kernel truth (the cgroup the kernel
//! reported, the destination from connect(2), answers the kernel saw
//! arrive); nothing is read from the application's memory.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use kloak_bpf::{Conn, Event};

use crate::datapath::dns::DnsCache;
use crate::datapath::secrets::Secret;

/// Where the kernel says a process's sockets go. The loaded programs answer
/// in the agent; unit tests answer from a table.
pub trait Connections {
    fn conn(&self, tgid: u32, fd: i32) -> Option<Conn>;
}

impl Connections for kloak_bpf::Probes {
    fn conn(&self, tgid: u32, fd: i32) -> Option<Conn> {
        kloak_bpf::Probes::conn(self, tgid, fd)
    }
}

/// Why a placeholder went out unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReason {
    /// The writer's pod does not reference the secret: it learned the
    /// placeholder some other way.
    NotBound,
    /// The socket's destination is unknown or not allowed by the rules.
    Destination,
    /// The secret requires the wire backend, which could not serve this
    /// write; no other backend may.
    RequireWire,
}

impl BlockReason {
    /// The `reason` label of `kloak_blocked_total`.
    pub fn label(self) -> &'static str {
        match self {
            BlockReason::NotBound => "not_bound",
            BlockReason::Destination => "destination",
            BlockReason::RequireWire => "require_wire",
        }
    }

    /// The span's `kloak.blocked.reason`.
    pub fn describe(self) -> &'static str {
        match self {
            BlockReason::NotBound => "the pod does not reference this secret",
            BlockReason::Destination => "destination not allowed for this secret",
            BlockReason::RequireWire => {
                "the secret is served by the wire backend only (requireWire, or destination rules under the wire backend), which could not serve this write"
            }
        }
    }
}

/// The answer for one (write, secret) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Block(Blocked),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub reason: BlockReason,
    /// The socket's destination, when known (for the log line).
    pub dest: Option<SocketAddr>,
    /// Names trusted answers gave that destination (for the log line).
    pub names: Vec<String>,
}

pub struct Authoriser {
    /// Per cgroup id (or pid group), the secrets its processes may receive.
    /// None (`kloak run`): every secret is theirs.
    bindings: Option<HashMap<u64, HashSet<u32>>>,
    dns: DnsCache,
}

impl Authoriser {
    /// `per_pod`: the node agent, where each container gets only what its
    /// pod references; otherwise (`kloak run`) every tracked process may
    /// receive every secret.
    pub fn new(dns: DnsCache, per_pod: bool) -> Self {
        Authoriser {
            bindings: per_pod.then(HashMap::new),
            dns,
        }
    }

    /// Sets what a tracked group may receive; true when the group is new.
    pub fn bind(&mut self, group: u64, secrets: HashSet<u32>) -> bool {
        self.bindings
            .get_or_insert_with(HashMap::new)
            .insert(group, secrets)
            .is_none()
    }

    pub fn unbind(&mut self, group: u64) {
        if let Some(b) = &mut self.bindings {
            b.remove(&group);
        }
    }

    /// The secrets `group` may receive; None when every secret is (`kloak run`).
    pub fn bound(&self, group: u64) -> Option<Vec<u32>> {
        self.bindings.as_ref().map(|b| {
            b.get(&group)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default()
        })
    }

    pub fn dns(&self) -> &DnsCache {
        &self.dns
    }

    pub fn dns_mut(&mut self) -> &mut DnsCache {
        &mut self.dns
    }

    /// Bindings first: a pod that does not reference the secret gets a
    /// block whatever the destination.
    pub fn decide(&self, e: &Event, s: &Secret, conns: &dyn Connections) -> Decision {
        if let Some(b) = &self.bindings
            && !b.get(&e.cgroup).is_some_and(|set| set.contains(&s.id))
        {
            return Decision::Block(Blocked {
                reason: BlockReason::NotBound,
                dest: None,
                names: Vec::new(),
            });
        }
        if s.rules.unrestricted() {
            return Decision::Allow;
        }
        let (dest, names) = match e.fd.and_then(|fd| conns.conn(e.tgid, fd)) {
            Some(c) => (
                Some(c.dest),
                self.dns.names_at(e.tgid, c.dest.ip(), c.connected_ns),
            ),
            None => (None, Vec::new()),
        };
        if let Some(d) = dest
            && s.rules.allows(d, &names)
        {
            return Decision::Allow;
        }
        Decision::Block(Blocked {
            reason: BlockReason::Destination,
            dest,
            names: names.into_iter().map(str::to_string).collect(),
        })
    }

    /// The socket's destination and the first name a trusted answer gave it
    /// when the connection was made: what a span says about the peer.
    pub fn peer(&self, e: &Event, conns: &dyn Connections) -> (Option<Conn>, Option<String>) {
        let conn = e.fd.and_then(|fd| conns.conn(e.tgid, fd));
        let name = conn.and_then(|c| {
            self.dns
                .names_at(e.tgid, c.dest.ip(), c.connected_ns)
                .into_iter()
                .next()
                .map(str::to_string)
        });
        (conn, name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::IpAddr;

    use kloak_bpf::EventKind;

    use super::*;
    use crate::datapath::rules::Rules;
    use crate::datapath::secrets::SecretValue;

    /// Connections from a table: (tgid, fd) → destination.
    #[derive(Default)]
    pub(crate) struct Table(pub HashMap<(u32, i32), Conn>);

    impl Connections for Table {
        fn conn(&self, tgid: u32, fd: i32) -> Option<Conn> {
            self.0.get(&(tgid, fd)).copied()
        }
    }

    pub(crate) fn event(tgid: u32, cgroup: u64, fd: Option<i32>) -> Event {
        Event {
            kind: EventKind::Rewrite,
            ts_ns: 0,
            cgroup,
            tgid,
            tid: tgid,
            buf: 0x1000,
            len: 64,
            abi: Some(kloak_bpf::WriteAbi::SslWrite),
            dev: 0,
            ino: 0,
            unreadable: false,
            overflow: false,
            huffman: false,
            comm: "client".into(),
            hits: Vec::new(),
            unknown: 0,
            fd,
            split: None,
        }
    }

    pub(crate) fn secret(id: u32, placeholder: &str, value: &[u8], rules: Rules) -> Secret {
        Secret::new(
            id,
            format!("s{id}"),
            SecretValue::new(value.to_vec()),
            placeholder.into(),
            rules,
        )
    }

    fn rules(hosts: &[&str], ports: &[u16]) -> Rules {
        Rules::parse(
            &hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            ports,
        )
        .unwrap()
    }

    const RESOLVER: &str = "10.0.0.53";

    /// A DNS answer `name` → `ip` (TTL 60 s) that process `tgid` read at `ts_ns`.
    fn answer(dns: &mut DnsCache, tgid: u32, name: &str, ip: [u8; 4], ts_ns: u64) {
        let mut p = simple_dns::Packet::new_reply(7);
        p.questions.push(simple_dns::Question::new(
            simple_dns::Name::new_unchecked(name).into_owned(),
            simple_dns::TYPE::A.into(),
            simple_dns::CLASS::IN.into(),
            false,
        ));
        p.answers.push(simple_dns::ResourceRecord::new(
            simple_dns::Name::new_unchecked(name),
            simple_dns::CLASS::IN,
            60,
            simple_dns::rdata::RData::A(simple_dns::rdata::A {
                address: u32::from_be_bytes(ip),
            }),
        ));
        let bytes = p.build_bytes_vec().unwrap();
        let src = SocketAddr::new(RESOLVER.parse().unwrap(), 53);
        let learned = dns.record(tgid, src, ts_ns, &bytes);
        assert!(!learned.is_empty(), "the test answer was not accepted");
    }

    fn conn_to(ip: [u8; 4], port: u16, at: u64) -> Conn {
        Conn {
            dest: SocketAddr::new(IpAddr::from(ip), port),
            connected_ns: at,
        }
    }

    fn authoriser(per_pod: bool) -> Authoriser {
        Authoriser::new(DnsCache::new(vec![RESOLVER.parse().unwrap()], 64), per_pod)
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_secret_without_rules_goes_anywhere_even_to_an_unknown_socket() {
        let a = authoriser(false);
        let s = secret(1, "kloak:ABCDEFGH", b"value-01", Rules::default());
        assert_eq!(
            a.decide(&event(10, 5, None), &s, &Table::default()),
            Decision::Allow
        );
    }

    #[test]
    fn a_pod_gets_only_the_secrets_it_is_bound_to() {
        let mut a = authoriser(true);
        let s1 = secret(1, "kloak:ABCDEFGH", b"value-01", Rules::default());
        let s2 = secret(2, "kloak:JKMNPQRS", b"value-02", Rules::default());
        let conns = Table::default();
        // Not tracked at all: nothing is bound.
        assert!(matches!(
            a.decide(&event(10, 5, None), &s1, &conns),
            Decision::Block(Blocked {
                reason: BlockReason::NotBound,
                ..
            })
        ));
        assert!(a.bind(5, HashSet::from([1])));
        assert!(!a.bind(5, HashSet::from([1])), "a re-bind is not new");
        assert_eq!(a.decide(&event(10, 5, None), &s1, &conns), Decision::Allow);
        assert!(matches!(
            a.decide(&event(10, 5, None), &s2, &conns),
            Decision::Block(Blocked {
                reason: BlockReason::NotBound,
                ..
            })
        ));
        // Another container's cgroup does not inherit the binding.
        assert!(matches!(
            a.decide(&event(10, 6, None), &s1, &conns),
            Decision::Block(Blocked {
                reason: BlockReason::NotBound,
                ..
            })
        ));
        a.unbind(5);
        assert!(matches!(
            a.decide(&event(10, 5, None), &s1, &conns),
            Decision::Block(Blocked { .. })
        ));
    }

    #[test]
    fn a_name_counts_only_if_the_writer_itself_resolved_it_before_connecting() {
        let mut a = authoriser(false);
        let s = secret(
            1,
            "kloak:ABCDEFGH",
            b"value-01",
            rules(&["api.example.com"], &[443]),
        );
        answer(a.dns_mut(), 10, "api.example.com", [192, 0, 2, 7], 5 * SEC);
        let mut conns = Table::default();
        conns
            .0
            .insert((10, 3), conn_to([192, 0, 2, 7], 443, 6 * SEC));
        // Another process resolved nothing: its connection to the same IP is not verified.
        conns
            .0
            .insert((11, 3), conn_to([192, 0, 2, 7], 443, 6 * SEC));
        // Connected before the answer arrived.
        conns
            .0
            .insert((10, 4), conn_to([192, 0, 2, 7], 443, 4 * SEC));
        // Connected after the answer's TTL ran out.
        conns
            .0
            .insert((10, 5), conn_to([192, 0, 2, 7], 443, 70 * SEC));
        // The right host on a port the rules do not list.
        conns
            .0
            .insert((10, 6), conn_to([192, 0, 2, 7], 8443, 6 * SEC));

        assert_eq!(
            a.decide(&event(10, 1, Some(3)), &s, &conns),
            Decision::Allow
        );
        for (tgid, fd) in [(11, 3), (10, 4), (10, 5), (10, 6)] {
            let d = a.decide(&event(tgid, 1, Some(fd)), &s, &conns);
            assert!(
                matches!(
                    d,
                    Decision::Block(Blocked {
                        reason: BlockReason::Destination,
                        ..
                    })
                ),
                "pid {tgid} fd {fd}: {d:?}"
            );
        }
        // A write whose socket the kernel does not know is blocked too.
        assert_eq!(
            a.decide(&event(10, 1, None), &s, &conns),
            Decision::Block(Blocked {
                reason: BlockReason::Destination,
                dest: None,
                names: Vec::new(),
            })
        );
    }

    #[test]
    fn an_untrusted_resolver_authorises_nothing() {
        let mut a = authoriser(false);
        let s = secret(
            1,
            "kloak:ABCDEFGH",
            b"value-01",
            rules(&["api.example.com"], &[]),
        );
        let mut p = simple_dns::Packet::new_reply(7);
        p.answers.push(simple_dns::ResourceRecord::new(
            simple_dns::Name::new_unchecked("api.example.com"),
            simple_dns::CLASS::IN,
            60,
            simple_dns::rdata::RData::A(simple_dns::rdata::A {
                address: u32::from_be_bytes([192, 0, 2, 7]),
            }),
        ));
        let forged = SocketAddr::new("192.0.2.66".parse().unwrap(), 53);
        a.dns_mut()
            .record(10, forged, SEC, &p.build_bytes_vec().unwrap());
        let mut conns = Table::default();
        conns
            .0
            .insert((10, 3), conn_to([192, 0, 2, 7], 443, 2 * SEC));
        assert!(matches!(
            a.decide(&event(10, 1, Some(3)), &s, &conns),
            Decision::Block(Blocked {
                reason: BlockReason::Destination,
                ..
            })
        ));
    }

    #[test]
    fn ip_and_cidr_rules_need_no_dns_and_the_peer_names_the_verified_host() {
        let mut a = authoriser(false);
        let s = secret(
            1,
            "kloak:ABCDEFGH",
            b"value-01",
            rules(&["192.0.2.0/24"], &[]),
        );
        let mut conns = Table::default();
        conns.0.insert((10, 3), conn_to([192, 0, 2, 9], 443, SEC));
        conns
            .0
            .insert((10, 4), conn_to([198, 51, 100, 1], 443, SEC));
        assert_eq!(
            a.decide(&event(10, 1, Some(3)), &s, &conns),
            Decision::Allow
        );
        assert!(matches!(
            a.decide(&event(10, 1, Some(4)), &s, &conns),
            Decision::Block(Blocked { .. })
        ));
        answer(a.dns_mut(), 10, "api.example.com", [192, 0, 2, 9], SEC / 2);
        let (conn, name) = a.peer(&event(10, 1, Some(3)), &conns);
        assert_eq!(conn.unwrap().dest.port(), 443);
        assert_eq!(name.as_deref(), Some("api.example.com"));
    }
}
