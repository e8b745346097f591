//! Per-secret destination rules: which hosts and ports may receive a value.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::datapath::dns::normalise;

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    /// A name a trusted DNS answer must have given the destination address.
    Exact(String),
    /// `*.example.com`: any name strictly below `example.com` (stored as ".example.com").
    Wildcard(String),
    /// An address literal: no DNS needed.
    Ip(IpAddr),
    Cidr(IpNet),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    hosts: Vec<HostRule>,
    ports: Vec<u16>,
}

fn valid_dns_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl Rules {
    /// Parses `hosts` entries: exact names, `*.` wildcards, IP literals, CIDRs.
    /// The error names the entry and what is wrong with it.
    pub fn parse(hosts: &[String], ports: &[u16]) -> Result<Rules, String> {
        let mut out = Vec::with_capacity(hosts.len());
        for raw in hosts {
            let h = raw.trim();
            let rule = if let Ok(ip) = h.parse::<IpAddr>() {
                HostRule::Ip(ip)
            } else if h.contains('/') {
                HostRule::Cidr(h.parse::<IpNet>().map_err(|_| {
                    format!("host {raw:?} looks like a CIDR but is not one (e.g. 10.0.0.0/8)")
                })?)
            } else if let Some(rest) = h.strip_prefix("*.") {
                let rest = normalise(rest);
                if !valid_dns_name(&rest) || rest.contains('*') {
                    return Err(format!(
                        "host {raw:?}: a wildcard is \"*.\" followed by a DNS name"
                    ));
                }
                HostRule::Wildcard(format!(".{rest}"))
            } else {
                let n = normalise(h);
                if !valid_dns_name(&n) {
                    return Err(format!(
                        "host {raw:?} is not a DNS name, \"*.\" wildcard, IP address or CIDR"
                    ));
                }
                HostRule::Exact(n)
            };
            out.push(rule);
        }
        if ports.contains(&0) {
            return Err("port 0 is not a destination port".into());
        }
        Ok(Rules {
            hosts: out,
            ports: ports.to_vec(),
        })
    }

    /// No host and no port rule: any destination receives the value.
    pub fn unrestricted(&self) -> bool {
        self.hosts.is_empty() && self.ports.is_empty()
    }

    /// Whether `dest`, whose address trusted DNS answers named `names` when
    /// the connection was made, may receive the value.
    pub fn allows(&self, dest: SocketAddr, names: &[&str]) -> bool {
        let port_ok = self.ports.is_empty() || self.ports.contains(&dest.port());
        let host_ok = self.hosts.is_empty()
            || self.hosts.iter().any(|r| match r {
                HostRule::Exact(n) => names.contains(&n.as_str()),
                HostRule::Wildcard(sfx) => names.iter().any(|n| n.ends_with(sfx.as_str())),
                HostRule::Ip(ip) => dest.ip() == *ip,
                HostRule::Cidr(net) => net.contains(&dest.ip()),
            });
        port_ok && host_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(hosts: &[&str], ports: &[u16]) -> Rules {
        Rules::parse(
            &hosts.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ports,
        )
        .unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn exact_names_need_a_verified_name() {
        let rules = r(&["Allowed.Test"], &[]);
        assert!(rules.allows(sa("127.0.0.2:443"), &["allowed.test"]));
        assert!(
            !rules.allows(sa("127.0.0.2:443"), &[]),
            "an address without a DNS answer is not verified"
        );
        assert!(!rules.allows(sa("127.0.0.3:443"), &["other.test"]));
    }

    #[test]
    fn wildcards_match_strictly_below() {
        let rules = r(&["*.svc.test"], &[]);
        assert!(rules.allows(sa("127.0.0.4:443"), &["api.svc.test"]));
        assert!(rules.allows(sa("127.0.0.4:443"), &["a.b.svc.test"]));
        assert!(!rules.allows(sa("127.0.0.4:443"), &["svc.test"]));
        assert!(!rules.allows(sa("127.0.0.4:443"), &["evilsvc.test"]));
    }

    #[test]
    fn ip_and_cidr_rules_need_no_dns() {
        assert!(r(&["127.0.0.2"], &[]).allows(sa("127.0.0.2:1"), &[]));
        assert!(r(&["127.0.0.0/30"], &[]).allows(sa("127.0.0.3:1"), &[]));
        assert!(!r(&["127.0.0.0/30"], &[]).allows(sa("127.0.0.4:1"), &[]));
        assert!(r(&["::1"], &[]).allows(sa("[::1]:443"), &[]));
    }

    #[test]
    fn ports_restrict_on_their_own_or_with_hosts() {
        assert!(r(&[], &[443]).allows(sa("1.2.3.4:443"), &[]));
        assert!(!r(&[], &[443]).allows(sa("1.2.3.4:8443"), &[]));
        assert!(
            !r(&["allowed.test"], &[443, 8443]).allows(sa("127.0.0.2:9443"), &["allowed.test"])
        );
        assert!(r(&[], &[]).unrestricted());
    }

    #[test]
    fn bad_hosts_are_named() {
        for bad in [
            "exa mple.com",
            "*.",
            "a.*.b",
            "10.0.0.0/33",
            "-x.test",
            "*.*.test",
        ] {
            let e = Rules::parse(&[bad.to_string()], &[]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(Rules::parse(&[], &[0]).is_err());
    }
}
