//! Loading what a previous agent knew (from the state file) back into the
//! kernel maps and the DNS cache, for processes that still run. Only the
//! kernel's word counts: a descriptor may name another socket by now.

use std::collections::HashMap;
use std::time::Instant;

use kloak_bpf::Probes;

use crate::datapath::dns::DnsCache;
use crate::state::mirror;

/// What a restore loaded into the maps.
#[derive(Debug, Default, Clone, Copy)]
pub struct Restored {
    pub dns_answers: u64,
    pub connections: u64,
    pub tls_objects: u64,
}

/// The records a previous agent left.
pub struct Records {
    pub dns: Vec<kloak_storage::DnsRecord>,
    pub conns: Vec<(kloak_storage::ConnKey, kloak_storage::ConnRecord)>,
    pub ssl: Vec<kloak_storage::SslRecord>,
}

pub fn restore(probes: &Probes, dns: &mut DnsCache, r: Records) -> Restored {
    let (mut answers, mut sockets, mut tls) = (0, 0, 0);
    // Thousands of records name a few processes: look each up once.
    let mut alive_cache: HashMap<(u32, u64), bool> = HashMap::new();
    let mut alive = |tgid: u32, start: u64| {
        *alive_cache
            .entry((tgid, start))
            .or_insert_with(|| mirror::process_alive(tgid, start))
    };
    for s in r.ssl {
        if alive(s.tgid, s.start_time) && probes.put_ssl_fd(s.tgid, s.ptr, s.fd).is_ok() {
            tls += 1;
        }
    }
    for d in r.dns {
        if alive(d.tgid, d.start_time)
            && let Ok(ip) = d.ip.parse()
        {
            dns.restore(d.tgid, ip, d.name, d.seen_ns, d.expires_ns);
            answers += 1;
        }
    }
    let t_conns = Instant::now();
    let mut peers = crate::datapath::sockets::Peers::default();
    let mut stale = 0u64;
    for (k, c) in r.conns {
        let Ok(dest) = c.dest.parse() else { continue };
        if !alive(k.tgid, k.start_time) {
            continue;
        }
        // The descriptor may name another socket by now (closed and reused
        // inside the window of loss): only the kernel's word counts.
        if !peers
            .peer(k.tgid, k.fd)
            .is_some_and(|p| crate::datapath::sockets::same_peer(p, dest))
        {
            stale += 1;
            continue;
        }
        let conn = kloak_bpf::Conn {
            dest,
            connected_ns: c.connected_ns,
        };
        if probes.put_conn(k.tgid, k.fd, &conn).is_ok() {
            sockets += 1;
        }
    }
    tracing::info!(
        answers,
        sockets,
        stale_sockets = stale,
        tls_objects = tls,
        connections_ms = t_conns.elapsed().as_millis() as u64,
        "DNS answers and connections restored from the state file"
    );
    Restored {
        dns_answers: answers,
        connections: sockets,
        tls_objects: tls,
    }
}
