//! The DNS cache behind destination checks: which names a trusted resolver
//! said an address had, and until when.
//!
//! The kernel hands over each answer to a query a tracked process sent, read
//! from the packet it received (`bpf/src/bpf/dns.h`): the source address and
//! port are the packet's, and the process is the one whose task sent the
//! query. Answers from any source other than a trusted resolver are dropped
//! here and authorise nothing. Each name is valid for its record's TTL
//! from the moment the answer arrived.
//!
//! Answers are scoped to the process that received them: an address counts as
//! `allowed.test` for a process only if that process itself was told so. A
//! process that connects to a bare address, or pins a name to an address
//! (`curl --resolve`), is not verified by another process's lookup.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use simple_dns::rdata::RData;
use simple_dns::{OPCODE, Packet, PacketFlag, RCODE};

/// Nameservers in a resolv.conf.
pub fn resolv_conf_nameservers(path: &Path) -> Vec<IpAddr> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == "nameserver").then(|| f.next()?.split('%').next()?.parse().ok())?
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    seen_ns: u64,
    expires_ns: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DnsStats {
    pub answers: u64,
    pub untrusted: u64,
    pub malformed: u64,
    pub addresses: u64,
}

/// Address → names, with the window in which each answer was valid.
pub struct DnsCache {
    trusted: Vec<IpAddr>,
    by_ip: HashMap<(u32, IpAddr), Vec<Entry>>,
    /// Insertion order, for evicting the oldest address past `capacity`.
    order: VecDeque<(u32, IpAddr)>,
    capacity: usize,
    pub stats: DnsStats,
}

const NS: u64 = 1_000_000_000;

impl DnsCache {
    pub fn new(trusted: Vec<IpAddr>, capacity: usize) -> Self {
        DnsCache {
            trusted,
            by_ip: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            stats: DnsStats::default(),
        }
    }

    /// Records an answer process `tgid` received at `ts_ns` (kernel monotonic
    /// clock) from `source`. Returns what it learned, (address, name, valid
    /// from, valid until), for the state file.
    pub fn record(
        &mut self,
        tgid: u32,
        source: SocketAddr,
        ts_ns: u64,
        payload: &[u8],
    ) -> Vec<(IpAddr, String, u64, u64)> {
        let mut learned = Vec::new();
        if !self.trusted.contains(&source.ip()) {
            self.stats.untrusted += 1;
            return learned;
        }
        let Ok(p) = Packet::parse(payload) else {
            self.stats.malformed += 1;
            return learned;
        };
        // Only a plain answer: a resolver that refuses or does not
        // understand a message may echo it back, records and all, and the
        // application wrote that message.
        if !p.has_flags(PacketFlag::RESPONSE)
            || p.opcode() != OPCODE::StandardQuery
            || p.rcode() != RCODE::NoError
        {
            return learned;
        }
        self.stats.answers += 1;
        let Some(q) = p.questions.first() else {
            return learned;
        };
        let asked = normalise(&q.qname.to_string());

        // Follow the CNAME chain from the name asked for; every address at the
        // end of it is verified for that name (and for the aliases on the way).
        let mut chain: Vec<(String, u32)> = vec![(asked.clone(), u32::MAX)];
        let mut changed = true;
        while changed {
            changed = false;
            for rr in &p.answers {
                if let RData::CNAME(c) = &rr.rdata {
                    let owner = normalise(&rr.name.to_string());
                    let target = normalise(&c.0.to_string());
                    if let Some(&(_, ttl)) = chain.iter().find(|(n, _)| *n == owner)
                        && !chain.iter().any(|(n, _)| *n == target)
                    {
                        chain.push((target, ttl.min(rr.ttl)));
                        changed = true;
                    }
                }
            }
        }
        for rr in &p.answers {
            let ip = match &rr.rdata {
                RData::A(a) => IpAddr::from(a.address.to_be_bytes()),
                RData::AAAA(a) => IpAddr::from(a.address.to_be_bytes()),
                _ => continue,
            };
            let owner = normalise(&rr.name.to_string());
            let Some(&(_, chain_ttl)) = chain.iter().find(|(n, _)| *n == owner) else {
                continue;
            };
            let ttl = u64::from(rr.ttl.min(chain_ttl));
            for (name, _) in chain.iter().filter(|(n, _)| *n == asked || *n == owner) {
                self.insert((tgid, ip), name.clone(), ts_ns, ts_ns + ttl * NS);
                learned.push((ip, name.clone(), ts_ns, ts_ns + ttl * NS));
            }
        }
        learned
    }

    /// Puts back an answer a previous agent recorded (from the state file).
    pub fn restore(&mut self, tgid: u32, ip: IpAddr, name: String, seen_ns: u64, expires_ns: u64) {
        self.insert((tgid, ip), name, seen_ns, expires_ns);
    }

    fn insert(&mut self, key: (u32, IpAddr), name: String, seen_ns: u64, expires_ns: u64) {
        let entries = match self.by_ip.get_mut(&key) {
            Some(e) => e,
            None => {
                if self.by_ip.len() >= self.capacity
                    && let Some(old) = self.order.pop_front()
                {
                    self.by_ip.remove(&old);
                }
                self.order.push_back(key);
                self.stats.addresses += 1;
                self.by_ip.entry(key).or_default()
            }
        };
        // A fresh answer for the same name extends its window; older windows
        // stay, so a connection made under them keeps its verification.
        if let Some(e) = entries
            .iter_mut()
            .find(|e| e.name == name && e.expires_ns >= seen_ns)
        {
            e.expires_ns = e.expires_ns.max(expires_ns);
        } else {
            entries.push(Entry {
                name,
                seen_ns,
                expires_ns,
            });
            if entries.len() > 64 {
                entries.remove(0);
            }
        }
    }

    /// Names a trusted answer to process `tgid` gave `ip` at the instant `at_ns`.
    pub fn names_at(&self, tgid: u32, ip: IpAddr, at_ns: u64) -> Vec<&str> {
        self.by_ip
            .get(&(tgid, ip))
            .into_iter()
            .flatten()
            .filter(|e| e.seen_ns <= at_ns && at_ns < e.expires_ns)
            .map(|e| e.name.as_str())
            .collect()
    }
}

pub fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::rdata::{A, CNAME};
    use simple_dns::{CLASS, Name, Question, ResourceRecord, TYPE};

    fn answer(q: &str, records: Vec<ResourceRecord<'static>>) -> Vec<u8> {
        let mut p = Packet::new_reply(1);
        p.questions.push(Question::new(
            Name::new_unchecked(q).into_owned(),
            TYPE::A.into(),
            CLASS::IN.into(),
            false,
        ));
        p.answers = records;
        p.build_bytes_vec().unwrap()
    }

    fn a(name: &'static str, ip: [u8; 4], ttl: u32) -> ResourceRecord<'static> {
        ResourceRecord::new(
            Name::new_unchecked(name),
            CLASS::IN,
            ttl,
            RData::A(A {
                address: u32::from_be_bytes(ip),
            }),
        )
    }

    const RESOLVER: &str = "127.0.0.153:53";

    #[test]
    fn a_records_verify_their_name_for_the_ttl() {
        let mut c = DnsCache::new(vec!["127.0.0.153".parse().unwrap()], 16);
        c.record(
            7,
            RESOLVER.parse().unwrap(),
            10 * NS,
            &answer("Allowed.Test.", vec![a("allowed.test", [127, 0, 0, 2], 5)]),
        );
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(c.names_at(7, ip, 12 * NS), vec!["allowed.test"]);
        assert!(
            c.names_at(7, ip, 16 * NS).is_empty(),
            "expired after the TTL"
        );
        assert!(
            c.names_at(7, ip, 9 * NS).is_empty(),
            "not before it was seen"
        );
        assert!(
            c.names_at(8, ip, 12 * NS).is_empty(),
            "another process's lookup verifies nothing here"
        );
    }

    #[test]
    fn cname_chains_lead_back_to_the_name_asked_for() {
        let mut c = DnsCache::new(vec!["127.0.0.153".parse().unwrap()], 16);
        let cname = ResourceRecord::new(
            Name::new_unchecked("api.svc.test"),
            CLASS::IN,
            30,
            RData::CNAME(CNAME(Name::new_unchecked("lb.svc.test"))),
        );
        c.record(
            7,
            RESOLVER.parse().unwrap(),
            NS,
            &answer(
                "api.svc.test",
                vec![cname, a("lb.svc.test", [127, 0, 0, 4], 60)],
            ),
        );
        let names = c.names_at(7, "127.0.0.4".parse().unwrap(), 2 * NS);
        assert!(
            names.contains(&"api.svc.test") && names.contains(&"lb.svc.test"),
            "{names:?}"
        );
        assert!(
            c.names_at(7, "127.0.0.4".parse().unwrap(), 35 * NS)
                .is_empty(),
            "the chain's shortest TTL bounds it"
        );
    }

    #[test]
    fn answers_from_untrusted_sources_authorise_nothing() {
        let mut c = DnsCache::new(vec!["127.0.0.153".parse().unwrap()], 16);
        c.record(
            7,
            "127.0.0.99:53".parse().unwrap(),
            NS,
            &answer("allowed.test", vec![a("allowed.test", [6, 6, 6, 6], 60)]),
        );
        assert!(c.names_at(7, "6.6.6.6".parse().unwrap(), 2 * NS).is_empty());
        assert_eq!(c.stats.untrusted, 1);
        c.record(7, RESOLVER.parse().unwrap(), NS, b"garbage that is not dns");
        assert_eq!(c.stats.malformed, 1);
    }

    #[test]
    fn an_echoed_refusal_verifies_nothing() {
        // A resolver that answers FORMERR or NOTIMP may copy the message it
        // got, answer records the application wrote included.
        let mut c = DnsCache::new(vec!["127.0.0.153".parse().unwrap()], 16);
        let bytes = answer("allowed.test", vec![a("allowed.test", [6, 6, 6, 6], 60)]);
        let mut p = Packet::parse(&bytes).unwrap();
        *p.rcode_mut() = RCODE::FormatError;
        c.record(
            7,
            RESOLVER.parse().unwrap(),
            NS,
            &p.build_bytes_vec().unwrap(),
        );
        *p.rcode_mut() = RCODE::NoError;
        *p.opcode_mut() = OPCODE::Notify;
        c.record(
            7,
            RESOLVER.parse().unwrap(),
            NS,
            &p.build_bytes_vec().unwrap(),
        );
        assert!(c.names_at(7, "6.6.6.6".parse().unwrap(), 2 * NS).is_empty());
    }

    #[test]
    fn capacity_evicts_the_oldest_address() {
        let mut c = DnsCache::new(vec!["127.0.0.153".parse().unwrap()], 2);
        for i in 1..=3u8 {
            c.record(
                7,
                RESOLVER.parse().unwrap(),
                NS,
                &answer("x.test", vec![a("x.test", [10, 0, 0, i], 60)]),
            );
        }
        assert!(
            c.names_at(7, "10.0.0.1".parse().unwrap(), 2 * NS)
                .is_empty()
        );
        assert_eq!(
            c.names_at(7, "10.0.0.3".parse().unwrap(), 2 * NS),
            vec!["x.test"]
        );
    }

    #[test]
    fn resolv_conf_parsing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("resolv.conf");
        std::fs::write(
            &p,
            "# c\nsearch x\nnameserver 127.0.0.153\nnameserver fe80::1%eth0\noptions ndots:1\n",
        )
        .unwrap();
        assert_eq!(
            resolv_conf_nameservers(&p),
            vec![
                "127.0.0.153".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
    }
}
