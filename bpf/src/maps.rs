//! What the agent keeps in the programs' maps: secrets, tracked cgroups,
//! pids and files, socket destinations, scrub hand-overs; and what it reads
//! back: stats and map fill.

use libbpf_rs::{MapCore, MapFlags};

use crate::events::ip_from;
use crate::pod::{pod_bytes, read_pod};
use crate::types::{self, addr_family, stat_idx};
use crate::{
    Conn, Error, Hit, KEY_LEN, MAX_HITS, MAX_SECRET_LEN, MIN_SECRET_LEN, PREFIX, PREFIX_LEN,
    Probes, Result,
};

/// What a map entry holds for one secret.
pub struct SecretEntry<'a> {
    pub id: u32,
    pub placeholder: &'a [u8],
    /// Only given to the kernel for the in-place and wire backends.
    pub value: Option<&'a [u8]>,
    /// Only the wire backend may serve it: the kernel never stops a writer
    /// for it, nor writes it into the writer's memory.
    pub require_wire: bool,
    /// The secret has destination rules and the wire backend is loaded:
    /// only the wire serves it, except to processes in the configured pause
    /// network namespace ([`crate::Config::pause_netns`]).
    pub wire_rules: bool,
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
    /// Wire backend: placeholders armed, packets patched, placeholders it
    /// could not place in a record, placeholders not armed for want of a
    /// patch slot, packets dropped because a patch failed.
    pub wire_armed: u64,
    pub wire_packets: u64,
    pub wire_misses: u64,
    pub wire_full: u64,
    pub wire_drops: u64,
    /// Wire backend: writes it could not serve (suite, keys, library),
    /// served by the pause backend instead.
    pub wire_fallbacks: u64,
    /// Wire backend: ChaCha20-Poly1305 records whose sequence number no
    /// candidate near the estimate proved; they went out unpatched.
    pub wire_unproven: u64,
    /// Placeholders of require-wire secrets sent unchanged: the wire could
    /// not serve their write, and no other backend may.
    pub require_wire: u64,
    /// DNS queries tracked sockets sent, kept for their answers.
    pub dns_queries: u64,
    /// Answers that matched their socket's query: address, port, id, once.
    pub dns_answers: u64,
    /// Replies on a kept query's socket and id that came from another
    /// address or port, or too late: they verify nothing.
    pub dns_mismatched: u64,
    /// Queries from sockets in a network namespace another user namespace
    /// owns (an unprivileged user may have made it): not kept.
    pub dns_foreign: u64,
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

impl Stats {
    /// The counters from the `stats` array, indexed by its slots.
    pub(crate) fn from_slots(s: &[u64; stat_idx::ST_MAX.0 as usize]) -> Stats {
        let at = |i: stat_idx| s[i.0 as usize];
        Stats {
            writes: at(stat_idx::ST_WRITES),
            bytes: at(stat_idx::ST_BYTES),
            hits: at(stat_idx::ST_HITS),
            unknown: at(stat_idx::ST_UNKNOWN),
            lost_events: at(stat_idx::ST_LOST),
            unreadable: at(stat_idx::ST_UNREADABLE),
            overflow: at(stat_idx::ST_OVERFLOW),
            tailcall_failures: at(stat_idx::ST_TAILCALL_FAIL),
            stops: at(stat_idx::ST_STOPS),
            write_failures: at(stat_idx::ST_WRITE_FAIL),
            huffman_candidates: at(stat_idx::ST_HUFFMAN),
            splits: at(stat_idx::ST_SPLIT),
            wire_armed: at(stat_idx::ST_WIRE_ARMED),
            wire_packets: at(stat_idx::ST_WIRE_PACKETS),
            wire_misses: at(stat_idx::ST_WIRE_MISS),
            wire_full: at(stat_idx::ST_WIRE_FULL),
            wire_drops: at(stat_idx::ST_WIRE_DROPS),
            wire_fallbacks: at(stat_idx::ST_WIRE_FALLBACK),
            wire_unproven: at(stat_idx::ST_WIRE_UNPROVEN),
            require_wire: at(stat_idx::ST_REQUIRE_WIRE),
            dns_queries: at(stat_idx::ST_DNS_QUERIES),
            dns_answers: at(stat_idx::ST_DNS_ANSWERS),
            dns_mismatched: at(stat_idx::ST_DNS_MISMATCH),
            dns_foreign: at(stat_idx::ST_DNS_FOREIGN),
        }
    }
}

/// The map entry of `e` under `backend`. The value goes in only where a
/// program of that backend reads it: the wire's patches, the in-place
/// writes; never for a require-wire secret under the in-place backend,
/// whose program must not write it anyway.
fn secret_val(backend: crate::Backend, e: &SecretEntry<'_>) -> Result<types::secret_val> {
    if e.placeholder.len() > MAX_SECRET_LEN {
        return Err(Error::Entry("placeholder is longer than a map entry holds"));
    }
    let mut v = types::secret_val {
        len: e.placeholder.len() as u32,
        id: e.id,
        flags: if e.require_wire {
            types::secret_flag::SECRET_REQUIRE_WIRE.0
        } else {
            0
        } | if e.wire_rules {
            types::secret_flag::SECRET_WIRE_RULES.0
        } else {
            0
        },
        _pad: 0,
        placeholder: [0; MAX_SECRET_LEN],
        value: [0; MAX_SECRET_LEN],
    };
    v.placeholder[..e.placeholder.len()].copy_from_slice(e.placeholder);
    let wanted = match backend {
        crate::Backend::Wire => true,
        crate::Backend::InPlace => !e.require_wire,
        crate::Backend::Pause => false,
    };
    if wanted {
        let value = e.value.ok_or(Error::Entry(
            "the in-place and wire backends need the value",
        ))?;
        if value.len() != e.placeholder.len() {
            return Err(Error::Entry("value and placeholder differ in length"));
        }
        v.value[..value.len()].copy_from_slice(value);
    }
    Ok(v)
}

impl Probes {
    pub fn put_secret(&self, e: &SecretEntry<'_>) -> Result<()> {
        let key = placeholder_key(e.placeholder).ok_or(Error::Entry(
            "placeholder lacks the kloak: prefix or is too short",
        ))?;
        let mut v = secret_val(self.backend, e)?;
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
            &m.dns_queries,
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
        let mut s = [0u64; stat_idx::ST_MAX.0 as usize];
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
        Stats::from_slots(&s)
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
                (addr_family::AF_INET, a)
            }
            std::net::IpAddr::V6(v6) => (addr_family::AF_INET6, v6.octets()),
        };
        let v = types::conn_val {
            ts_ns: c.connected_ns,
            family: family.0 as u16,
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
}

impl Probes {
    /// Tells the wire backend whether secret `id` may go from process
    /// `tgid` to `dest` (the address the kernel's socket holds).
    pub fn set_wire_allow(
        &self,
        tgid: u32,
        id: u32,
        dest: std::net::SocketAddr,
        allow: bool,
    ) -> Result<()> {
        let mut key = types::allow_key {
            tgid,
            id,
            family: 0,
            port: dest.port().to_be(),
            _pad: 0,
            addr: [0; 16],
        };
        match dest.ip() {
            std::net::IpAddr::V4(v4) => {
                key.family = addr_family::AF_INET.0 as u16;
                key.addr[..4].copy_from_slice(&v4.octets());
            }
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => {
                    key.family = addr_family::AF_INET.0 as u16;
                    key.addr[..4].copy_from_slice(&v4.octets());
                }
                None => {
                    key.family = addr_family::AF_INET6.0 as u16;
                    key.addr = v6.octets();
                }
            },
        }
        let val = if allow {
            types::allow_val::ALLOW_YES.0
        } else {
            types::allow_val::ALLOW_NO.0
        } as u8;
        self.skel
            .maps
            .wire_allow
            .update(pod_bytes(&key), &[val], MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "wire_allow",
                source,
            })
    }

    /// Secret `id` may go to any destination: the wire arms it without a
    /// per-destination decision. Only for a secret without rules where no
    /// per-pod binding applies.
    pub fn set_wire_any_destination(&self, id: u32) -> Result<()> {
        self.skel
            .maps
            .wire_any_dest
            .update(&id.to_ne_bytes(), &[1u8], MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: "wire_any_dest",
                source,
            })
    }

    /// Forgets every wire decision of process `tgid` (it exited).
    pub fn forget_wire_allow(&self, tgid: u32) {
        let map = &self.skel.maps.wire_allow;
        let keys: Vec<Vec<u8>> = map
            .keys()
            .filter(|k| k.len() >= 4 && u32::from_ne_bytes([k[0], k[1], k[2], k[3]]) == tgid)
            .collect();
        for k in keys {
            let _ = map.delete(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_carries_the_flag_and_the_value_only_where_a_program_reads_it() {
        use crate::Backend;
        let e = |require_wire| SecretEntry {
            wire_rules: false,
            id: 7,
            placeholder: b"kloak:ABCDEFGH",
            value: Some(b"sk-real-value1"),
            require_wire,
        };
        let flag = types::secret_flag::SECRET_REQUIRE_WIRE.0;
        for (backend, require_wire, flags, value_in) in [
            (Backend::Wire, true, flag, true),
            (Backend::Wire, false, 0, true),
            (Backend::InPlace, false, 0, true),
            (Backend::InPlace, true, flag, false),
            (Backend::Pause, true, flag, false),
            (Backend::Pause, false, 0, false),
        ] {
            let v = secret_val(backend, &e(require_wire)).unwrap();
            let what = format!("{backend:?}, require_wire {require_wire}");
            assert_eq!((v.len, v.id, v.flags), (14, 7, flags), "{what}");
            assert_eq!(&v.placeholder[..14], b"kloak:ABCDEFGH", "{what}");
            assert_eq!(
                v.value[..14] == *b"sk-real-value1",
                value_in,
                "{what}: the value in the entry"
            );
            if !value_in {
                assert!(v.value.iter().all(|&b| b == 0), "{what}");
            }
        }
        let short = SecretEntry {
            wire_rules: false,
            value: Some(b"short"),
            ..e(false)
        };
        assert!(secret_val(Backend::Wire, &short).is_err());
        assert!(secret_val(Backend::Pause, &short).is_ok(), "no value read");
    }

    #[test]
    fn key_pads_short_placeholders() {
        assert_eq!(placeholder_key(b"kloak:AB"), Some(*b"AB\0\0\0\0\0\0"));
        assert_eq!(placeholder_key(b"kloak:ABCDEFGHJK"), Some(*b"ABCDEFGH"));
        assert_eq!(placeholder_key(b"kloak:A"), None);
        assert_eq!(placeholder_key(b"cloak:ABCDEFGH"), None);
    }
}
