//! `kloak run` under the wire backend: a process whose records the wire
//! patched, and which holds `CAP_NET_RAW` where the patch happens, could
//! capture its own packets after the patch (AF_PACKET taps run after egress
//! tc) and decrypt the value with its own TLS keys. Kloak trusts such a
//! process, and says so, once per process.
//!
//! The check is on the process that wrote, with the credentials of the image
//! it runs: a wrapper that drops the capability before it execs the client
//! (`setpriv`, `su`) is not what is warned about, the client is.

use std::collections::{HashMap, HashSet};

/// `CAP_NET_RAW`'s bit in the capability sets of `/proc/PID/status`.
const CAP_NET_RAW: u32 = 13;

#[derive(Default)]
pub struct NetRaw {
    /// pid -> whether the image it exec'd last holds the capability.
    held: HashMap<u32, bool>,
    warned: HashSet<u32>,
    /// Forgotten after the batch: its reports may come in the same drain.
    exited: Vec<u32>,
}

impl NetRaw {
    /// A tracked process exec'd: its new image's credentials, read while it
    /// is stopped at the exec (a short-lived client is gone by the time
    /// its batched reports arrive).
    pub fn exec(&mut self, pid: u32) {
        if let Some(h) = holds_net_raw(pid) {
            self.held.insert(pid, h);
        }
    }

    /// The wire armed a write of `pid`.
    pub fn armed(&mut self, pid: u32, comm: &str) {
        let held = match self.held.get(&pid) {
            Some(&h) => Some(h),
            None => holds_net_raw(pid),
        };
        if held == Some(true) && self.warned.insert(pid) {
            tracing::warn!(
                pid,
                comm,
                "this process holds CAP_NET_RAW in the network namespace where the wire backend patches its records: it could capture its own packets after the patch and decrypt the value with its own keys; run it as an unprivileged user (setpriv, su) or without that capability unless you trust it"
            );
        }
    }

    pub fn exited(&mut self, pid: u32) {
        self.exited.push(pid);
    }

    pub fn end_of_batch(&mut self) {
        for pid in self.exited.drain(..) {
            self.held.remove(&pid);
            self.warned.remove(&pid);
        }
    }
}

/// Whether `pid` holds CAP_NET_RAW (effective, permitted or ambient) in the
/// agent's own user namespace; None when it is gone. A process in a user
/// namespace of its own holds its capabilities there, not over our devices.
fn holds_net_raw(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let own_userns = match (
        std::fs::read_link(format!("/proc/{pid}/ns/user")),
        std::fs::read_link("/proc/self/ns/user"),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => true,
    };
    Some(own_userns && status_has_net_raw(&status))
}

fn status_has_net_raw(status: &str) -> bool {
    status.lines().any(|l| {
        let Some((k, v)) = l.split_once(':') else {
            return false;
        };
        matches!(k, "CapEff" | "CapPrm" | "CapAmb")
            && u64::from_str_radix(v.trim(), 16).is_ok_and(|m| m & (1 << CAP_NET_RAW) != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_capability_from_any_of_the_three_sets() {
        let root = "Name:\tcurl\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        assert!(status_has_net_raw(root));
        let nobody = "CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapAmb:\t0000000000000000\n";
        assert!(!status_has_net_raw(nobody));
        let ambient =
            "CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapAmb:\t0000000000002000\n";
        assert!(status_has_net_raw(ambient));
        // Everything but CAP_NET_RAW.
        let all_but = "CapPrm:\t000001ffffffdfff\nCapEff:\t000001ffffffdfff\n";
        assert!(!status_has_net_raw(all_but));
    }

    #[test]
    fn warns_once_per_process_and_forgets_it_after_the_batch() {
        let mut n = NetRaw::default();
        n.held.insert(7, true);
        n.armed(7, "client");
        assert!(n.warned.contains(&7));
        n.exited(7);
        assert!(
            n.held.contains_key(&7),
            "reports of the same drain still find it"
        );
        n.end_of_batch();
        assert!(!n.held.contains_key(&7) && !n.warned.contains(&7));
    }

    #[test]
    fn this_process_is_read() {
        // The test runs as whoever runs it; the answer just has to exist.
        assert!(holds_net_raw(std::process::id()).is_some());
    }
}
