//! The pause backend: a write whose thread the kernel stopped. Called only
//! once the whole thread group is stopped and the ring buffer drained
//! again (the loop in `agent.rs` keeps that order); each placeholder is
//! authorised, then patched over the bytes the kernel saw, and the scrub
//! that puts it back after the library returns is armed.

use std::collections::HashMap;

use kloak_bpf::{Event, EventKind, Hit, MAX_HITS};
use zeroize::Zeroizing;

use crate::datapath::authorise::{Authoriser, BlockReason, Blocked, Connections, Decision};
use crate::datapath::backend::BackendKind;
use crate::datapath::record::{Recorder, inc};
use crate::datapath::rewrite::{Memory, Patched, SecretTable, patch};
use crate::datapath::secrets::Secret;

/// Largest buffer the agent reads whole when the kernel could not scan it.
pub const MAX_USER_SCAN: u64 = 64 << 20;

/// What the pause backend asks of the loaded programs beyond connections.
pub trait Kernel: Connections {
    /// Tells the return probe which placeholders to put back for thread `tid`.
    fn arm_scrub(&self, tid: u32, buf: u64, hits: &[(Hit, &[u8])]) -> Result<(), kloak_bpf::Error>;
}

impl Kernel for kloak_bpf::Probes {
    fn arm_scrub(&self, tid: u32, buf: u64, hits: &[(Hit, &[u8])]) -> Result<(), kloak_bpf::Error> {
        kloak_bpf::Probes::arm_scrub(self, tid, buf, hits)
    }
}

/// What serving a stopped write reads: the parts it does not own.
pub struct Parts<'a> {
    pub secrets: &'a SecretTable,
    pub auth: &'a Authoriser,
    pub rec: &'a Recorder,
    pub mem: &'a dyn Memory,
    pub kernel: &'a dyn Kernel,
    pub wire_rules: crate::datapath::backend::WireRules,
}

/// Bytes rewritten for an HPACK placeholder, kept until the scrub.
struct HuffPatch {
    addr: u64,
    original: Vec<u8>,
    patched: Zeroizing<Vec<u8>>,
}

#[derive(Clone, Copy)]
enum Direction {
    ToValue,
    ToPlaceholder,
}

pub struct Pause {
    scrub: bool,
    /// HPACK swaps per thread, undone when that thread's write returns.
    huffman_scrubs: HashMap<u32, Vec<HuffPatch>>,
    /// Per thread, the placeholders of a user-space scan beyond the
    /// MAX_HITS the kernel's scrub entry holds: put back at that same
    /// scrub, or the values would stay in the buffer after the call.
    extra_scrubs: HashMap<u32, Vec<Hit>>,
}

const BACKEND: BackendKind = BackendKind::Pause;

impl Pause {
    pub fn new(scrub: bool) -> Self {
        Pause {
            scrub,
            huffman_scrubs: HashMap::new(),
            extra_scrubs: HashMap::new(),
        }
    }

    /// Serves one event of a stopped thread group.
    pub fn serve(&mut self, p: &Parts<'_>, e: &Event) {
        match e.kind {
            EventKind::Rewrite => {
                for h in &e.hits {
                    self.patch_hit(p, e, h, Direction::ToValue);
                }
            }
            EventKind::Scrub => {
                let extra = self.extra_scrubs.remove(&e.tid).unwrap_or_default();
                for h in e.hits.iter().chain(&extra) {
                    self.patch_hit(p, e, h, Direction::ToPlaceholder);
                }
                self.unswap_huffman(p, e);
            }
            EventKind::Scan => self.user_scan(p, e),
            _ => {}
        }
    }

    /// Whether secret `s` may go out in this write; a block is recorded.
    /// Every value this backend writes into a process passes here.
    fn allowed(p: &Parts<'_>, e: &Event, s: &Secret) -> bool {
        // The kernel keeps require-wire hits out of what it stops for; a
        // user-space scan finds them all the same, and a kernel that failed
        // to must not make this backend write the value.
        let connected = || {
            e.fd.and_then(|fd| p.kernel.conn(e.tgid, fd))
                .map(|c| c.connected_ns)
        };
        if s.require_wire || p.wire_rules.refuses(s, e.tgid, connected()) {
            let b = Blocked {
                reason: BlockReason::RequireWire,
                dest: None,
                names: Vec::new(),
            };
            p.rec
                .blocked(e, s, &b, BACKEND, &|| p.auth.peer(e, p.kernel));
            return false;
        }
        match p.auth.decide(e, s, p.kernel) {
            Decision::Allow => true,
            Decision::Block(b) => {
                p.rec
                    .blocked(e, s, &b, BACKEND, &|| p.auth.peer(e, p.kernel));
                false
            }
        }
    }

    /// Writes the value (or, scrubbing, the placeholder) at one hit; true if it did.
    fn patch_hit(&self, p: &Parts<'_>, e: &Event, h: &Hit, dir: Direction) -> bool {
        let Some(s) = p.secrets.get(h.secret_id) else {
            return false;
        };
        let (from, to) = match dir {
            Direction::ToValue => (s.placeholder.as_bytes(), s.value.expose()),
            Direction::ToPlaceholder => (s.value.expose(), s.placeholder.as_bytes()),
        };
        if matches!(dir, Direction::ToValue) && !Self::allowed(p, e, s) {
            return false;
        }
        let peer = || p.auth.peer(e, p.kernel);
        match patch(p.mem, e.tgid, e.buf + h.offset, from, to) {
            Patched::Written => {
                match dir {
                    Direction::ToValue => p.rec.rewritten(e, s, BACKEND, false, &peer),
                    Direction::ToPlaceholder => p.rec.scrubbed(e, Some(s), BACKEND, &peer),
                }
                true
            }
            Patched::Mismatch => {
                inc(&p.rec.counters.mismatched);
                false
            }
            Patched::ReadFailed(err) => {
                inc(&p.rec.counters.patch_errors);
                tracing::warn!(pid = e.tgid, secret = %s.name, error = %err, "reading the write buffer failed");
                false
            }
            Patched::WriteFailed(err) => {
                inc(&p.rec.counters.patch_errors);
                tracing::warn!(pid = e.tgid, secret = %s.name, error = %err, "patching the write buffer failed");
                false
            }
        }
    }

    /// The kernel could not read the buffer (or found more prefixes than it
    /// tracks): scan it here, where reading faults pages in.
    fn user_scan(&mut self, p: &Parts<'_>, e: &Event) {
        inc(&p.rec.counters.user_scans);
        if e.len > MAX_USER_SCAN {
            tracing::warn!(
                pid = e.tgid,
                len = e.len,
                "write too large to scan; placeholders go out unchanged"
            );
            return;
        }
        let data = match p.mem.read(e.tgid, e.buf, e.len as usize) {
            Ok(d) => d,
            Err(err) => {
                inc(&p.rec.counters.patch_errors);
                tracing::warn!(pid = e.tgid, error = %err, "reading the write buffer failed");
                return;
            }
        };
        let found = p.secrets.scan(&data);
        let mut done: Vec<(Hit, &[u8])> = Vec::new();
        for (at, s) in &found.matches {
            let h = Hit {
                offset: *at as u64,
                secret_id: s.id,
                len: s.placeholder.len() as u32,
            };
            if self.patch_hit(p, e, &h, Direction::ToValue) {
                done.push((h, s.placeholder.as_bytes()));
            }
        }
        self.note_scanned(p, e, found.unknown, found.split);
        let huffman = if e.huffman {
            self.swap_huffman(p, e, &data)
        } else {
            Vec::new()
        };
        let scrubbable = e.abi.is_some_and(|a| a.supports_return_probe());
        if self.scrub && scrubbable && !huffman.is_empty() {
            self.huffman_scrubs.insert(e.tid, huffman);
        }
        if self.scrub
            && scrubbable
            && (!done.is_empty() || self.huffman_scrubs.contains_key(&e.tid))
        {
            let armed = done.len().min(MAX_HITS);
            if done.len() > armed {
                self.extra_scrubs
                    .insert(e.tid, done[armed..].iter().map(|(h, _)| *h).collect());
            }
            if let Err(err) = p.kernel.arm_scrub(e.tid, e.buf, &done[..armed]) {
                tracing::warn!(error = %err, "arming the scrub failed");
            }
        }
    }

    /// What a user-space scan found that the kernel would have reported
    /// itself: recorded the same way.
    fn note_scanned(
        &self,
        p: &Parts<'_>,
        e: &Event,
        unknown: u32,
        split: Option<kloak_bpf::SplitTail>,
    ) {
        let unknown = (unknown > 0).then(|| Event {
            kind: EventKind::Unknown,
            unknown,
            ..e.clone()
        });
        let split = split.map(|t| Event {
            kind: EventKind::Split,
            split: Some(t),
            ..e.clone()
        });
        for noted in unknown.into_iter().chain(split) {
            let cut = noted
                .split
                .as_ref()
                .and_then(|t| p.secrets.cut_short(t))
                .map(|s| &**s);
            p.rec.noted(
                &noted,
                BACKEND,
                cut,
                &|id| p.secrets.get(id).cloned(),
                &|| p.auth.peer(&noted, p.kernel),
            );
        }
    }

    /// HTTP/2: swaps, bit for bit, the Huffman code of every HPACK-safe
    /// placeholder in `data` for the value's, touching only the bytes the
    /// code spans. Returns what was written, for the scrub.
    fn swap_huffman(&self, p: &Parts<'_>, e: &Event, data: &[u8]) -> Vec<HuffPatch> {
        let mut done = Vec::new();
        for sw in p.secrets.huffman_swaps(data) {
            let s = &*sw.secret;
            if !Self::allowed(p, e, s) {
                continue;
            }
            let addr = e.buf + sw.offset as u64;
            match patch(p.mem, e.tgid, addr, &sw.original, &sw.patched) {
                Patched::Written => {
                    p.rec
                        .rewritten(e, s, BACKEND, true, &|| p.auth.peer(e, p.kernel));
                    done.push(HuffPatch {
                        addr,
                        original: sw.original,
                        patched: sw.patched,
                    });
                }
                // As for ASCII: only over the bytes the scan saw.
                Patched::Mismatch | Patched::ReadFailed(_) => inc(&p.rec.counters.mismatched),
                Patched::WriteFailed(err) => {
                    inc(&p.rec.counters.patch_errors);
                    tracing::warn!(pid = e.tgid, secret = %s.name, error = %err, "patching the write buffer failed");
                }
            }
        }
        done
    }

    /// Puts the Huffman-coded placeholders back after the write returned.
    fn unswap_huffman(&mut self, p: &Parts<'_>, e: &Event) {
        for h in self.huffman_scrubs.remove(&e.tid).unwrap_or_default() {
            match patch(p.mem, e.tgid, h.addr, &h.patched, &h.original) {
                Patched::Written => p.rec.scrubbed(e, None, BACKEND, &|| (None, None)),
                Patched::Mismatch | Patched::ReadFailed(_) => inc(&p.rec.counters.mismatched),
                Patched::WriteFailed(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::datapath::authorise::tests::{Table, event, secret};
    use crate::datapath::dns::DnsCache;
    use crate::datapath::rewrite::tests::Buf;
    use crate::datapath::rules::Rules;

    #[derive(Default)]
    struct FakeKernel {
        conns: Table,
        armed: std::cell::RefCell<Vec<(u32, u64, Vec<u64>)>>,
    }

    impl Connections for FakeKernel {
        fn conn(&self, tgid: u32, fd: i32) -> Option<kloak_bpf::Conn> {
            self.conns.conn(tgid, fd)
        }
    }

    impl Kernel for FakeKernel {
        fn arm_scrub(
            &self,
            tid: u32,
            buf: u64,
            hits: &[(Hit, &[u8])],
        ) -> Result<(), kloak_bpf::Error> {
            self.armed
                .borrow_mut()
                .push((tid, buf, hits.iter().map(|(h, _)| h.offset).collect()));
            Ok(())
        }
    }

    const BASE: u64 = 0x7000;
    const P1: &str = "kloak:ABCDEFGHJK";
    const V1: &[u8] = b"sk-live-value-01";
    const P2: &str = "kloak:MNPQRSTVWX";
    const V2: &[u8] = b"sk-live-value-02";

    struct World {
        secrets: SecretTable,
        auth: Authoriser,
        rec: Recorder,
        kernel: FakeKernel,
    }

    impl World {
        /// Secret 1 for anyone, secret 2 only to 192.0.2.7; cgroup 5 is
        /// bound to both, cgroup 6 only to 1.
        fn new() -> World {
            let ruled = Rules::parse(&["192.0.2.7".to_string()], &[]).unwrap();
            let mut auth = Authoriser::new(DnsCache::new(Vec::new(), 8), true);
            auth.bind(5, HashSet::from([1, 2]));
            auth.bind(6, HashSet::from([1]));
            let mut kernel = FakeKernel::default();
            kernel.conns.0.insert(
                (10, 3),
                kloak_bpf::Conn {
                    dest: "192.0.2.7:443".parse().unwrap(),
                    connected_ns: 1,
                },
            );
            World {
                secrets: SecretTable::new([
                    secret(1, P1, V1, Rules::default()),
                    secret(2, P2, V2, ruled),
                ]),
                auth,
                rec: Recorder::new(Arc::default(), None),
                kernel,
            }
        }

        fn parts<'a>(&'a self, mem: &'a Buf) -> Parts<'a> {
            Parts {
                secrets: &self.secrets,
                auth: &self.auth,
                rec: &self.rec,
                mem,
                kernel: &self.kernel,
                wire_rules: Default::default(),
            }
        }
    }

    fn stopped(kind: EventKind, cgroup: u64, fd: Option<i32>, data: &[u8]) -> Event {
        let mut e = event(10, cgroup, fd);
        e.kind = kind;
        e.buf = BASE;
        e.len = data.len() as u64;
        e.hits = [P1, P2]
            .iter()
            .filter_map(|p| {
                let at = data.windows(p.len()).position(|w| w == p.as_bytes())?;
                Some(Hit {
                    offset: at as u64,
                    secret_id: if *p == P1 { 1 } else { 2 },
                    len: p.len() as u32,
                })
            })
            .collect();
        e
    }

    fn text(mem: &Buf) -> String {
        String::from_utf8(mem.bytes.borrow().clone()).unwrap()
    }

    #[test]
    fn a_bound_pod_gets_each_value_only_where_its_rules_allow() {
        let w = World::new();
        let data = format!("a={P1}&b={P2}");
        // To the allowed destination: both values.
        let mem = Buf::new(BASE, data.as_bytes());
        let e = stopped(EventKind::Rewrite, 5, Some(3), data.as_bytes());
        Pause::new(true).serve(&w.parts(&mem), &e);
        assert_eq!(text(&mem), "a=sk-live-value-01&b=sk-live-value-02");
        // An unknown socket: the ruled secret stays a placeholder.
        let mem = Buf::new(BASE, data.as_bytes());
        let e = stopped(EventKind::Rewrite, 5, Some(99), data.as_bytes());
        Pause::new(true).serve(&w.parts(&mem), &e);
        assert_eq!(text(&mem), format!("a=sk-live-value-01&b={P2}"));
        // A pod bound to secret 1 only: the other stays, whatever the socket.
        let mem = Buf::new(BASE, data.as_bytes());
        let e = stopped(EventKind::Rewrite, 6, Some(3), data.as_bytes());
        Pause::new(true).serve(&w.parts(&mem), &e);
        assert_eq!(text(&mem), format!("a=sk-live-value-01&b={P2}"));
        let c = &w.rec.counters;
        assert_eq!(c.rewrites.load(Ordering::Relaxed), 4);
        assert_eq!(c.blocked.load(Ordering::Relaxed), 1);
        assert_eq!(c.unbound.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn changed_bytes_are_never_written_over() {
        let w = World::new();
        let data = format!("a={P1}");
        let mem = Buf::new(BASE, b"a=kloak:CHANGEDBYAPP");
        let e = stopped(EventKind::Rewrite, 5, Some(3), data.as_bytes());
        Pause::new(true).serve(&w.parts(&mem), &e);
        assert_eq!(text(&mem), "a=kloak:CHANGEDBYAPP");
        assert_eq!(w.rec.counters.mismatched.load(Ordering::Relaxed), 1);
        assert_eq!(w.rec.counters.rewrites.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_scrub_restores_the_placeholder_and_an_unknown_id_changes_nothing() {
        let w = World::new();
        let data = format!("a={P1}");
        let mem = Buf::new(BASE, b"a=sk-live-value-01");
        let e = stopped(EventKind::Scrub, 5, Some(3), data.as_bytes());
        Pause::new(true).serve(&w.parts(&mem), &e);
        assert_eq!(text(&mem), data);
        let mut e = stopped(EventKind::Rewrite, 5, Some(3), data.as_bytes());
        e.hits[0].secret_id = 42;
        Pause::new(true).serve(&w.parts(&mem), &e);
        assert_eq!(text(&mem), data);
    }

    #[test]
    fn a_user_scan_patches_what_it_may_arms_the_scrub_and_notes_the_rest() {
        let w = World::new();
        let data = format!("{P1} kloak:ZZZZZZZZ! {P2} {P1} kloak:MNP");
        let mem = Buf::new(BASE, data.as_bytes());
        let mut e = stopped(EventKind::Scan, 5, Some(99), data.as_bytes());
        e.hits.clear();
        Pause::new(true).serve(&w.parts(&mem), &e);
        // Secret 2's destination is unknown here: it stays.
        assert_eq!(
            text(&mem),
            format!("sk-live-value-01 kloak:ZZZZZZZZ! {P2} sk-live-value-01 kloak:MNP")
        );
        let armed = w.kernel.armed.borrow();
        assert_eq!(armed.len(), 1);
        let second = data.rfind(P1).unwrap() as u64;
        assert_eq!(armed[0], (10, BASE, vec![0, second]));
        let c = &w.rec.counters;
        assert_eq!(c.user_scans.load(Ordering::Relaxed), 1);
        assert_eq!(c.unknown_tokens.load(Ordering::Relaxed), 1);
        assert_eq!(c.splits.load(Ordering::Relaxed), 1);
        assert_eq!(c.blocked.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_user_scan_with_more_placeholders_than_the_kernel_holds_scrubs_them_all() {
        let w = World::new();
        let data = [P1; 12].join(",");
        let mem = Buf::new(BASE, data.as_bytes());
        let mut e = stopped(EventKind::Scan, 5, Some(3), data.as_bytes());
        e.hits.clear();
        let mut pause = Pause::new(true);
        pause.serve(&w.parts(&mem), &e);
        assert_eq!(text(&mem), ["sk-live-value-01"; 12].join(","));
        assert_eq!(w.kernel.armed.borrow()[0].2.len(), MAX_HITS);
        // The return probe's stop names the hits the kernel holds; the
        // agent puts back the rest too.
        let mut ret = stopped(EventKind::Scrub, 5, Some(3), data.as_bytes());
        ret.hits = (0..MAX_HITS as u64)
            .map(|i| Hit {
                offset: i * (P1.len() as u64 + 1),
                secret_id: 1,
                len: P1.len() as u32,
            })
            .collect();
        pause.serve(&w.parts(&mem), &ret);
        assert_eq!(text(&mem), data);
    }

    #[test]
    fn a_require_wire_secret_is_never_written_whatever_the_event() {
        use crate::datapath::hpack;
        let value = b"0123456789abcdef";
        let (p3, safe) = crate::datapath::secrets::Minted::default().mint_for(value);
        assert!(
            safe,
            "an HPACK-safe placeholder, so the Huffman path is tried too"
        );
        let mut w = World::new();
        w.secrets
            .insert(secret(3, &p3, value, Rules::default()).with_require_wire(true));
        w.auth.bind(5, HashSet::from([1, 2, 3]));
        let data = format!("a={P1}&c={p3}");
        let at3 = data.find(&p3).unwrap() as u64;

        // A stop the kernel should not have made for it (hits given), and
        // the user-space scan (no hits): the other secret is served, this
        // one never.
        for kind in [EventKind::Rewrite, EventKind::Scan] {
            let mem = Buf::new(BASE, data.as_bytes());
            let mut e = stopped(kind, 5, Some(3), data.as_bytes());
            if kind == EventKind::Rewrite {
                e.hits.push(Hit {
                    offset: at3,
                    secret_id: 3,
                    len: p3.len() as u32,
                });
            } else {
                e.hits.clear();
            }
            Pause::new(true).serve(&w.parts(&mem), &e);
            assert_eq!(text(&mem), format!("a=sk-live-value-01&c={p3}"), "{kind:?}");
        }

        // HTTP/2: its Huffman code is not swapped either.
        let mut bits = vec![true; 3];
        bits.extend(hpack::bits_of(p3.as_bytes()));
        let mut h2 = vec![0u8; 2 + bits.len().div_ceil(8) + 2];
        hpack::put_bits(&mut h2[2..], 0, &bits);
        let mem = Buf::new(BASE, &h2);
        let mut e = stopped(EventKind::Scan, 5, Some(3), &h2);
        e.hits.clear();
        e.huffman = true;
        Pause::new(true).serve(&w.parts(&mem), &e);
        assert_eq!(*mem.bytes.borrow(), h2, "the Huffman code was swapped");
        assert!(
            w.kernel
                .armed
                .borrow()
                .iter()
                .all(|(_, _, offs)| !offs.contains(&at3))
        );

        let c = &w.rec.counters;
        assert_eq!(c.require_wire.load(Ordering::Relaxed), 3);
        assert_eq!(c.rewrites.load(Ordering::Relaxed), 2, "secret 1, twice");
        assert_eq!(c.blocked.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn without_scrub_nothing_is_armed_and_a_failed_write_is_counted() {
        let w = World::new();
        let data = P1.to_string();
        let mem = Buf::new(BASE, data.as_bytes());
        let mut e = stopped(EventKind::Scan, 5, Some(3), data.as_bytes());
        e.hits.clear();
        Pause::new(false).serve(&w.parts(&mem), &e);
        assert!(w.kernel.armed.borrow().is_empty());
        assert_eq!(text(&mem), "sk-live-value-01");
        let mut mem = Buf::new(BASE, data.as_bytes());
        mem.fail_writes = true;
        Pause::new(true).serve(&w.parts(&mem), &e);
        assert_eq!(text(&mem), P1);
        assert_eq!(w.rec.counters.patch_errors.load(Ordering::Relaxed), 1);
    }
}
