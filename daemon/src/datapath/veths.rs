//! The node agent's wire hooks: the host side of every pod's veth.
//!
//! A pod's packets leave its network namespace through its veth and enter
//! the host's at the peer: that peer's tc ingress is where the agent
//! patches, because an application holding `CAP_NET_RAW` in its pod can tap
//! its own `eth0` (AF_PACKET taps run after egress tc) but not the host's
//! devices. The same peer's egress carries the servers' answers into the
//! pod, where the suite is learned from the ServerHello. tc ingress runs
//! before netfilter, so the packet still names the Service address the
//! socket connected to; the answer reaches the peer's egress after
//! conntrack has put that address back. Both sides key the flow as the
//! pod's socket does.
//!
//! Veths come and go with pods, so the agent listens for link changes on
//! rtnetlink and reconciles against a fresh dump of the links whose kind is
//! `veth`. A pod whose veth is not hooked yet still works: its suite is
//! never learned there, so its writes fall back to `pause`.

use std::collections::BTreeMap;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// `RTMGRP_LINK`: the multicast group of link changes.
const RTMGRP_LINK: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum VethError {
    #[error("rtnetlink: {0}")]
    Netlink(#[from] std::io::Error),
    #[error("rtnetlink: unreadable link message: {0}")]
    Decode(String),
    #[error("rtnetlink: the kernel refused the link dump: {0}")]
    Refused(String),
}

/// Attaching to a device; a trait so the reconcile logic is tested without
/// a kernel.
pub trait Hooks {
    type Link;
    fn attach(&self, ifindex: u32) -> Result<Vec<Self::Link>, String>;
}

impl Hooks for kloak_bpf::Probes {
    type Link = libbpf_rs::Link;
    fn attach(&self, ifindex: u32) -> Result<Vec<libbpf_rs::Link>, String> {
        use kloak_bpf::WireHook;
        [WireHook::IngressPatch, WireHook::EgressLearn]
            .into_iter()
            .map(|h| self.attach_wire(ifindex, h).map_err(|e| e.to_string()))
            .collect()
    }
}

struct Hooked<L> {
    name: String,
    _links: Vec<L>,
}

/// The veths hooked so far, and the socket that says when to look again.
pub struct PodVeths<L> {
    events: Socket,
    hooked: BTreeMap<u32, Hooked<L>>,
    /// Devices that refused: not retried until they change.
    refused: BTreeMap<u32, String>,
    stale: bool,
}

impl<L> PodVeths<L> {
    pub fn new() -> Result<Self, VethError> {
        let mut events = Socket::new(NETLINK_ROUTE)?;
        events.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        events.set_non_blocking(true)?;
        Ok(PodVeths {
            events,
            hooked: BTreeMap::new(),
            refused: BTreeMap::new(),
            stale: true,
        })
    }

    pub fn hooked(&self) -> usize {
        self.hooked.len()
    }

    /// Hooks veths that appeared since the last call and lets go of those
    /// gone. Costs one non-blocking `recv` when no link changed. Returns
    /// the devices that refused an attach this time.
    pub fn tick(&mut self, hooks: &impl Hooks<Link = L>) -> Vec<(String, String)> {
        let mut buf = vec![0u8; 16384];
        loop {
            match self.events.recv(&mut &mut buf[..], 0) {
                Ok(0) => break,
                Ok(_) => self.stale = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // ENOBUFS: changes were lost; the dump below sees them all.
                Err(_) => {
                    self.stale = true;
                    break;
                }
            }
        }
        if !self.stale {
            return Vec::new();
        }
        match veths() {
            Ok(now) => {
                self.stale = false;
                self.reconcile(&now, hooks)
            }
            Err(e) => {
                tracing::warn!(error = %e, "wire: listing the pods' veths failed; retrying");
                Vec::new()
            }
        }
    }

    fn reconcile(
        &mut self,
        now: &BTreeMap<u32, String>,
        hooks: &impl Hooks<Link = L>,
    ) -> Vec<(String, String)> {
        // An index now naming another device was deleted and reused: its
        // old links went with the old device.
        self.hooked
            .retain(|i, h| now.get(i).is_some_and(|n| *n == h.name));
        self.refused.retain(|i, n| now.get(i) == Some(n));
        let mut failed = Vec::new();
        for (&ifindex, name) in now {
            if self.hooked.contains_key(&ifindex) || self.refused.contains_key(&ifindex) {
                continue;
            }
            match hooks.attach(ifindex) {
                Ok(links) => {
                    tracing::info!(device = %name, ifindex, "wire: hooked a pod's veth");
                    self.hooked.insert(
                        ifindex,
                        Hooked {
                            name: name.clone(),
                            _links: links,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(device = %name, ifindex, error = %e, "wire: a pod's veth refused the wire hooks; its pod's writes go to pause");
                    self.refused.insert(ifindex, name.clone());
                    failed.push((name.clone(), e));
                }
            }
        }
        failed
    }
}

/// Inode of the host's network namespace, read as [`enter_host_netns`]
/// finds it; None when neither candidate is readable.
pub fn host_netns_inode() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    host_netns_candidates()
        .iter()
        .find_map(|p| std::fs::metadata(p).ok())
        .and_then(|m| u32::try_from(m.ino()).ok())
}

/// Where the host's network namespace can be read: kthreadd's (PID 2 in
/// the host's PID namespace), else PID 1's.
fn host_netns_candidates() -> &'static [&'static str] {
    let kthreadd = std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    if kthreadd {
        &["/proc/2/ns/net", "/proc/1/ns/net"]
    } else {
        &["/proc/1/ns/net"]
    }
}

/// Moves the calling thread into the host's network namespace, where the
/// pods' veths have their host side: the initial one, that of the kernel's
/// threads (`kthreadd`, PID 2 in the host's PID namespace, which the chart
/// shares with `hostPID`), else PID 1's. The agent's pod need not be
/// `hostNetwork`: only the data-path thread, which lists and hooks the
/// veths, moves; the admin server stays in the pod's namespace. A no-op
/// when already there.
///
/// Where neither can be read, the agent stays where it is, with a warning:
/// run it there with `hostNetwork`. Hooks in the wrong namespace are
/// harmless: no pod's suite is learned through them, so every write falls
/// back to `pause`, or, for a secret with destination rules, goes out with
/// the placeholder.
pub fn enter_host_netns() -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let why = "the wire backend patches on the pods' host-side veths, in the host's network namespace (the chart runs the agent with hostPID and privileged)";
    let ours = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?;
    let Some((host, theirs)) = host_netns_candidates()
        .iter()
        .find_map(|p| std::fs::metadata(p).ok().map(|m| (*p, m)))
    else {
        tracing::warn!(
            "wire: the host's network namespace cannot be read (/proc/2/ns/net, /proc/1/ns/net); hooking the veths of the agent's own network namespace, which must then be the host's (hostNetwork)"
        );
        return Ok(());
    };
    if (ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino()) {
        return Ok(());
    }
    let f = std::fs::File::open(host).map_err(|e| format!("{host}: {e}; {why}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("entering {host}: {e}; {why}"))?;
    tracing::info!(
        namespace = host,
        "wire: the data path entered the host's network namespace to hook the pods' veths"
    );
    Ok(())
}

/// The veths of the agent's network namespace: index -> name.
pub fn veths() -> Result<BTreeMap<u32, String>, VethError> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    let mut req = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    req.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut out = vec![0u8; req.buffer_len()];
    req.serialize(&mut out);
    s.send(&out, 0)?;

    let mut found = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = s.recv(&mut &mut buf[..], 0)?;
        let mut off = 0;
        while off < n {
            let msg: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&buf[off..n])
                    .map_err(|e| VethError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => return Err(VethError::Refused(format!("{e:?}"))),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    if let Some(name) = veth_name(&link) {
                        found.insert(link.header.index, name);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

fn veth_name(link: &LinkMessage) -> Option<String> {
    let mut name = None;
    let mut veth = false;
    for a in &link.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkInfo(infos) => {
                veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    name.filter(|_| veth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records attaches; refuses the devices named in `refuse`.
    struct Fake {
        attached: RefCell<Vec<u32>>,
        refuse: Vec<u32>,
    }

    impl Hooks for Fake {
        type Link = u32;
        fn attach(&self, ifindex: u32) -> Result<Vec<u32>, String> {
            if self.refuse.contains(&ifindex) {
                return Err("EPERM".into());
            }
            self.attached.borrow_mut().push(ifindex);
            Ok(vec![ifindex])
        }
    }

    fn devs(d: &[(u32, &str)]) -> BTreeMap<u32, String> {
        d.iter().map(|(i, n)| (*i, n.to_string())).collect()
    }

    #[test]
    fn new_veths_are_hooked_once_gone_ones_released_and_reused_indexes_hooked_again() {
        let mut v = PodVeths::<u32>::new().unwrap();
        let f = Fake {
            attached: RefCell::new(Vec::new()),
            refuse: vec![9],
        };
        let failed = v.reconcile(&devs(&[(5, "veth5"), (6, "veth6"), (9, "veth9")]), &f);
        assert_eq!(failed, vec![("veth9".to_string(), "EPERM".to_string())]);
        assert_eq!(*f.attached.borrow(), vec![5, 6]);
        // Nothing new: nothing attached again, the refusal not retried.
        assert!(
            v.reconcile(&devs(&[(5, "veth5"), (6, "veth6"), (9, "veth9")]), &f)
                .is_empty()
        );
        assert_eq!(*f.attached.borrow(), vec![5, 6]);
        // veth5 gone, index 6 reused by another device.
        v.reconcile(&devs(&[(6, "vethX"), (7, "veth7")]), &f);
        assert_eq!(*f.attached.borrow(), vec![5, 6, 6, 7]);
        assert_eq!(v.hooked(), 2);
    }

    /// Root: a veth pair made here shows up in the dump with its kind;
    /// loopback does not.
    #[test]
    fn the_dump_lists_veths_and_nothing_else() {
        if !nix::unistd::geteuid().is_root() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "this test makes a veth pair and must run as root under CI"
            );
            return;
        }
        let a = format!("kvt{}", std::process::id() % 100000);
        let b = format!("{a}p");
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap()
                .success()
        };
        assert!(ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]));
        let got = veths();
        ip(&["link", "del", &a]);
        let names: Vec<String> = got.unwrap().into_values().collect();
        assert!(names.contains(&a) && names.contains(&b), "{names:?}");
        assert!(!names.iter().any(|n| n == "lo"), "{names:?}");
    }
}
