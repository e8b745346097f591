//! The agent's side of the wire backend. The kernel patches records on the
//! wire by itself; the agent only decides destinations (a write whose
//! destination has no decision yet stops until it has one, and nothing is
//! written into it) and records what the kernel reports.
//!
//! A decision is keyed by the address the kernel's socket holds, read from
//! the socket itself, so a descriptor swapped after `connect(2)` (`dup2`,
//! `SSL_set_wfd`) gets the decision for where it really goes.

use std::net::SocketAddr;

use kloak_bpf::{Event, EventKind};

use crate::datapath::authorise::{Authoriser, BlockReason, Blocked, Connections, Decision};
use crate::datapath::backend::BackendKind;
use crate::datapath::record::{Recorder, inc};
use crate::datapath::rewrite::SecretTable;
use crate::datapath::sockets::same_peer;

const BACKEND: BackendKind = BackendKind::Wire;

/// Where decisions go and where sockets really point.
pub trait WireKernel: Connections {
    fn set_allow(&self, tgid: u32, id: u32, dest: SocketAddr, allow: bool);
    /// The remote address of `fd` in `tgid`, from the kernel's socket.
    fn socket_peer(&self, tgid: u32, fd: i32) -> Option<SocketAddr>;
}

pub struct Parts<'a> {
    pub secrets: &'a SecretTable,
    pub auth: &'a Authoriser,
    pub rec: &'a Recorder,
    pub kernel: &'a dyn WireKernel,
}

/// Decides every hit of a write stopped for a decision (`Decide`). The
/// caller continues the writer afterwards; the kernel arms the patches
/// at the socket write with the decisions written here.
pub fn decide(p: &Parts<'_>, e: &Event) {
    inc(&p.rec.counters.wire_decisions);
    decide_hits(p, e);
}

/// A tracked process connected a socket: decide now, for every secret its
/// group may receive, so its first write finds the decision and is not
/// stopped. (A write that still finds none stops for [`decide`].)
pub fn connected(p: &Parts<'_>, tgid: u32, fd: i32, group: u64) {
    let ids: Vec<u32> = p
        .auth
        .bound(group)
        .unwrap_or_else(|| p.secrets.ids().collect());
    if ids.is_empty() {
        return;
    }
    let e = Event {
        kind: EventKind::Decide,
        ts_ns: 0,
        cgroup: group,
        tgid,
        tid: tgid,
        buf: 0,
        len: 0,
        abi: None,
        dev: 0,
        ino: 0,
        unreadable: false,
        overflow: false,
        huffman: false,
        comm: String::new(),
        hits: ids
            .into_iter()
            .map(|id| kloak_bpf::Hit {
                offset: 0,
                secret_id: id,
                len: 0,
            })
            .collect(),
        unknown: 0,
        fd: Some(fd),
        split: None,
    };
    decide_hits(p, &e);
}

fn decide_hits(p: &Parts<'_>, e: &Event) {
    let real = e.fd.and_then(|fd| p.kernel.socket_peer(e.tgid, fd));
    let Some(real) = real else {
        tracing::debug!(
            pid = e.tgid,
            "wire: the write's socket is gone or not TCP; nothing to decide"
        );
        return;
    };
    // What connect(2) named must be where the socket goes now: otherwise
    // the decision would be for a destination this write does not reach.
    let named =
        e.fd.and_then(|fd| p.kernel.conn(e.tgid, fd))
            .map(|c| c.dest);
    let consistent = named.is_some_and(|n| same_peer(n, real));
    for h in &e.hits {
        let Some(s) = p.secrets.get(h.secret_id) else {
            continue;
        };
        let allow = consistent && p.auth.decide(e, s, p.kernel) == Decision::Allow;
        p.kernel.set_allow(e.tgid, s.id, real, allow);
        tracing::debug!(pid = e.tgid, secret = %s.name, destination = %real, allow, "wire: destination decided");
    }
}

/// Records what the kernel reported for a write it served alone.
pub fn record(p: &Parts<'_>, e: &Event) {
    let peer = || p.auth.peer(e, p.kernel);
    for h in &e.hits {
        let Some(s) = p.secrets.get(h.secret_id) else {
            continue;
        };
        match e.kind {
            EventKind::Armed => {
                inc(&p.rec.counters.wire_armed);
                p.rec.rewritten(e, s, BACKEND, false, &peer);
            }
            EventKind::Held => {
                let b = match p.auth.decide(e, s, p.kernel) {
                    Decision::Block(b) => b,
                    // Allowed by connect(2)'s address, refused on the
                    // socket's: a descriptor swapped under the write.
                    Decision::Allow => Blocked {
                        reason: BlockReason::Destination,
                        dest: e.fd.and_then(|fd| p.kernel.socket_peer(e.tgid, fd)),
                        names: Vec::new(),
                    },
                };
                p.rec.blocked(e, s, &b, BACKEND, &peer);
            }
            EventKind::WireMiss => {
                inc(&p.rec.counters.wire_misses);
                tracing::warn!(pid = e.tgid, comm = %e.comm, secret = %s.name, "wire: the write's records did not carry the placeholder as expected; it went out unchanged");
            }
            _ => {}
        }
    }
}

/// Attaches the tc programs to every device of the network namespace the
/// agent runs in (`kloak run`): loopback's way out patches and learns (both
/// ends are local); each Ethernet device's way out patches and its way in
/// learns suites from servers' answers. Devices added later are not
/// covered. Fails when any device refuses, naming it.
pub fn attach_host_devices(probes: &kloak_bpf::Probes) -> Result<Vec<libbpf_rs::Link>, String> {
    use kloak_bpf::WireHook;
    let mut links = Vec::new();
    for (ifindex, (name, hatype)) in devices()? {
        // ARPHRD_ETHER and ARPHRD_LOOPBACK: the programs expect an
        // Ethernet header before IP.
        let hooks: &[WireHook] = match hatype {
            ARPHRD_LOOPBACK => &[WireHook::EgressPatch],
            ARPHRD_ETHER => &[WireHook::EgressPatch, WireHook::IngressLearn],
            _ => continue,
        };
        for &h in hooks {
            links.push(
                probes
                    .attach_wire(ifindex, h)
                    .map_err(|e| format!("device {name}: {e}"))?,
            );
        }
    }
    Ok(links)
}

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

/// Devices of the agent's own network namespace: index -> (name, ARPHRD
/// type), from netlink (`getifaddrs`' link entries). Not /sys/class/net:
/// sysfs shows the devices of the namespace that mounted it, so an agent
/// started in a namespace of its own (`unshare -n`) would see the host's
/// and attach to indexes that name other devices, or none.
fn devices() -> Result<std::collections::BTreeMap<u32, (String, u16)>, String> {
    let all = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing network devices: {e}"))?;
    Ok(all
        .filter_map(|ifa| {
            let link = *ifa.address.as_ref()?.as_link_addr()?;
            let ifindex = u32::try_from(link.ifindex()).ok()?;
            Some((ifindex, (ifa.interface_name, link.hatype())))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_those_of_this_network_namespace() {
        let devs = devices().unwrap();
        // Every namespace has its loopback, and it is the only one here
        // with the loopback type.
        let lo: Vec<_> = devs
            .values()
            .filter(|(_, t)| *t == ARPHRD_LOOPBACK)
            .collect();
        assert_eq!(lo.len(), 1, "{devs:?}");
        for (ifindex, (name, _)) in &devs {
            let sys = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"));
            // This test runs where sysfs is this namespace's: both agree.
            if let Ok(sys) = sys {
                assert_eq!(sys.trim(), ifindex.to_string(), "{name}");
            }
        }
    }
}
