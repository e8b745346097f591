//! The kernel side and this crate agree on every record layout and every
//! number that crosses the boundary. Checked against the BTF of the compiled
//! object, which is what the kernel sees, and against how the Rust side
//! uses the values, not against the Rust types generated from that BTF.

use std::collections::BTreeMap;
use std::ffi::OsStr;

use libbpf_rs::HasSize;
use libbpf_rs::btf::types::{Array, Enum, Int, MemberAttr, Struct, Var};
use libbpf_rs::btf::{Btf, BtfType};

use crate::pod::pod_bytes;
use crate::types;
use crate::{
    ConnChange, ConnEvent, Event, EventKind, FdArg, KEY_LEN, MAX_HITS, MAX_SECRET_LEN,
    MIN_SECRET_LEN, PREFIX, PREFIX_LEN, Stats, WriteAbi,
};

fn object_btf() -> Btf<'static> {
    let path = concat!(env!("OUT_DIR"), "/kloak.bpf.o");
    Btf::from_path(path).unwrap_or_else(|e| panic!("reading the BTF of {path}: {e}"))
}

fn named<'a, T>(mut all: impl Iterator<Item = T>, name: &str) -> T
where
    T: std::ops::Deref<Target = BtfType<'a>>,
{
    all.find(|t| t.name() == Some(OsStr::new(name)))
        .unwrap_or_else(|| panic!("{name} is not in the object's BTF"))
}

fn size_of_type(t: BtfType<'_>) -> usize {
    let t = t.skip_mods_and_typedefs();
    if let Ok(a) = Array::try_from(t) {
        return a.capacity() * size_of_type(a.contained_type());
    }
    if let Ok(s) = Struct::try_from(t) {
        return s.size();
    }
    if let Ok(i) = Int::try_from(t) {
        return i.size();
    }
    if let Ok(e) = Enum::try_from(t) {
        return e.size();
    }
    panic!("no size for BTF type {t:?}");
}

/// C struct `name`: its size and each member's byte offset.
fn c_struct(btf: &Btf<'_>, name: &str) -> (usize, BTreeMap<String, usize>) {
    let s: Struct<'_> = named(btf.type_by_kind::<Struct<'_>>(), name);
    let members = s
        .iter()
        .map(|m| {
            let member = m.name.map(|n| n.to_string_lossy().into_owned());
            let member = member.unwrap_or_else(|| panic!("struct {name} has an unnamed member"));
            let MemberAttr::Normal { offset } = m.attr else {
                panic!("{name}.{member} is a bit field, which the Rust side cannot mirror");
            };
            assert_eq!(offset % 8, 0, "{name}.{member} is not byte aligned");
            (member, offset as usize / 8)
        })
        .collect();
    (s.size(), members)
}

/// Every member of C struct `name` is one of `rust` (by name, raw
/// identifiers unprefixed), at the same offset, and the sizes agree.
fn check_struct(btf: &Btf<'_>, name: &str, rust_size: usize, rust: &[(&str, usize)]) {
    let (c_size, c_members) = c_struct(btf, name);
    let rust: BTreeMap<String, usize> = rust
        .iter()
        .map(|&(n, off)| (n.trim_start_matches("r#").to_string(), off))
        .collect();
    assert_eq!(
        c_members.keys().collect::<Vec<_>>(),
        rust.keys().collect::<Vec<_>>(),
        "members of struct {name}: C vs the fields this test knows"
    );
    for (member, c_off) in &c_members {
        assert_eq!(
            *c_off, rust[member],
            "offset of {name}.{member}: C (BTF) vs Rust"
        );
    }
    assert_eq!(c_size, rust_size, "size of struct {name}: C (BTF) vs Rust");
}

macro_rules! check_layout {
    ($btf:expr, $ty:ident, [$($field:ident),* $(,)?]) => {
        check_struct(
            $btf,
            stringify!($ty),
            std::mem::size_of::<types::$ty>(),
            &[$((stringify!($field), std::mem::offset_of!(types::$ty, $field))),*],
        )
    };
}

#[test]
fn records_have_the_kernels_layout() {
    let btf = object_btf();
    let b = &btf;
    check_layout!(b, secret_key, [b]);
    check_layout!(b, secret_val, [len, id, flags, _pad, placeholder, value]);
    check_layout!(b, hit, [off, id, len, _pad, key]);
    check_layout!(
        b,
        tls_event,
        [
            ts_ns, cgroup, buf, len, cookie, dev, ino, kind, tgid, tid, nhits, flags, fd, comm,
            hits
        ]
    );
    check_layout!(b, pending, [buf, nmatch, _pad, r#match]);
    check_layout!(b, inode_key, [dev, ino]);
    check_layout!(b, obj_key, [tgid, _pad, ptr]);
    check_layout!(b, conn_key, [tgid, fd]);
    check_layout!(b, conn_val, [ts_ns, family, port, _pad, addr]);
    check_layout!(b, conn_event, [kind, tgid, fd, _pad, obj, v, group]);
    check_layout!(
        b,
        dns_event,
        [ts_ns, tgid, family, port, addr, len, _pad, payload]
    );
}

/// Key and value sizes of map `name` as the kernel object declares them.
fn map_sizes(btf: &Btf<'_>, name: &str) -> (usize, usize) {
    let var: Var<'_> = named(btf.type_by_kind::<Var<'_>>(), name);
    let def = Struct::try_from(
        var.next_type()
            .expect("a map is a struct")
            .skip_mods_and_typedefs(),
    )
    .expect("a map definition is a struct");
    let pointee = |field: &str| {
        let m = def
            .iter()
            .find(|m| m.name == Some(OsStr::new(field)))
            .unwrap_or_else(|| panic!("map {name} has no {field}"));
        let ptr: BtfType<'_> = btf.type_by_id(m.ty).expect("member type");
        size_of_type(ptr.next_type().expect("__type() is a pointer"))
    };
    (pointee("key"), pointee("value"))
}

#[test]
fn maps_take_the_keys_and_values_rust_writes() {
    use std::mem::size_of;
    let btf = object_btf();
    for (map, key, value) in [
        (
            "secret_map",
            size_of::<[u8; KEY_LEN]>(),
            size_of::<types::secret_val>(),
        ),
        ("tracked_cgroups", size_of::<u64>(), size_of::<u32>()),
        ("tracked_pids", size_of::<u32>(), size_of::<u64>()),
        (
            "known_inodes",
            size_of::<types::inode_key>(),
            size_of::<u8>(),
        ),
        (
            "conn_ip_map",
            size_of::<types::conn_key>(),
            size_of::<types::conn_val>(),
        ),
        ("ssl_fd", size_of::<types::obj_key>(), size_of::<i32>()),
        (
            "pending_scrub",
            size_of::<u32>(),
            size_of::<types::pending>(),
        ),
        ("stats", size_of::<u32>(), size_of::<u64>()),
        ("phase2_progs", size_of::<u32>(), size_of::<u32>()),
    ] {
        assert_eq!(
            map_sizes(&btf, map),
            (key, value),
            "map {map}: (key, value) size"
        );
    }
}

/// Enum `name`'s values by enumerator, each visited by `check`; the test
/// fails on an enumerator `check` does not know.
fn for_each_enumerator(btf: &Btf<'_>, name: &str, mut check: impl FnMut(&str, i64) -> bool) {
    let e: Enum<'_> = named(btf.type_by_kind::<Enum<'_>>(), name);
    assert!(!e.is_empty(), "enum {name} is empty");
    for v in e.iter() {
        let n = v.name.expect("named enumerator").to_string_lossy();
        assert!(
            check(&n, v.value),
            "enum {name}: {n} = {} has no Rust counterpart here",
            v.value
        );
    }
}

#[test]
fn limits_are_the_kernels() {
    let btf = object_btf();
    for_each_enumerator(&btf, "kloak_limits", |n, v| {
        let rust = match n {
            "PREFIX_LEN" => PREFIX_LEN,
            "MIN_SECRET_LEN" => MIN_SECRET_LEN,
            "MAX_SECRET_LEN" => MAX_SECRET_LEN,
            "KEY_LEN" => KEY_LEN,
            "MAX_HITS" => MAX_HITS,
            _ => return false,
        };
        assert_eq!(rust as i64, v, "{n}");
        true
    });
    assert_eq!(PREFIX.len(), PREFIX_LEN);
}

#[test]
fn event_kinds_parse_as_the_kernel_means_them() {
    let btf = object_btf();
    let mut seen = 0;
    for_each_enumerator(&btf, "event_kind", |n, v| {
        let want = match n {
            "EV_REWRITE" => EventKind::Rewrite,
            "EV_SCAN" => EventKind::Scan,
            "EV_SCRUB" => EventKind::Scrub,
            "EV_EXEC" => EventKind::Exec,
            "EV_MMAP" => EventKind::Mmap,
            "EV_REWRITTEN" => EventKind::Rewritten,
            "EV_SCRUBBED" => EventKind::Scrubbed,
            "EV_UNKNOWN" => EventKind::Unknown,
            "EV_EXIT" => EventKind::Exit,
            "EV_SPLIT" => EventKind::Split,
            "EV_ARMED" => EventKind::Armed,
            "EV_HELD" => EventKind::Held,
            "EV_WIRE_MISS" => EventKind::WireMiss,
            "EV_DECIDE" => EventKind::Decide,
            "EV_REQUIRE_WIRE" => EventKind::RequireWire,
            _ => return false,
        };
        assert_eq!(EventKind::from_raw(v as u32), Some(want), "{n} = {v}");
        let e = types::tls_event {
            kind: v as u32,
            ..Default::default()
        };
        let parsed = Event::parse(pod_bytes(&e)).expect("a known kind parses");
        assert_eq!(parsed.kind, want, "{n} through Event::parse");
        seen += 1;
        true
    });
    assert_eq!(seen, 15, "every EventKind has its enumerator");
    assert_eq!(EventKind::from_raw(0), None);
}

#[test]
fn event_flags_are_the_kernels_bits() {
    let btf = object_btf();
    let rewrite = named(btf.type_by_kind::<Enum<'_>>(), "event_kind")
        .iter()
        .find(|v| v.name == Some(OsStr::new("EV_REWRITE")))
        .expect("EV_REWRITE")
        .value as u32;
    for_each_enumerator(&btf, "event_flag", |n, v| {
        let which: fn(&Event) -> bool = match n {
            "EVF_UNREADABLE" => |e| e.unreadable,
            "EVF_OVERFLOW" => |e| e.overflow,
            "EVF_HUFFMAN" => |e| e.huffman,
            _ => return false,
        };
        let e = types::tls_event {
            kind: rewrite,
            flags: v as u32,
            ..Default::default()
        };
        let p = Event::parse(pod_bytes(&e)).expect("parses");
        assert!(which(&p), "{n} = {v} sets its flag");
        let set = [p.unreadable, p.overflow, p.huffman];
        assert_eq!(
            set.iter().filter(|&&b| b).count(),
            1,
            "{n} sets only its flag"
        );
        true
    });
}

#[test]
fn conn_kinds_parse_as_the_kernel_means_them() {
    let btf = object_btf();
    let af = |name: &str| {
        named(btf.type_by_kind::<Enum<'_>>(), "addr_family")
            .iter()
            .find(|v| v.name == Some(OsStr::new(name)))
            .unwrap_or_else(|| panic!("{name}"))
            .value as u16
    };
    let inet = af("AF_INET");
    for_each_enumerator(&btf, "conn_kind", |n, v| {
        let mut e = types::conn_event {
            kind: v as u32,
            tgid: 7,
            fd: 3,
            obj: 0x1000,
            group: 42,
            ..Default::default()
        };
        e.v.family = inet;
        e.v.addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        e.v.port = 443u16.to_be();
        let c = ConnEvent::parse(pod_bytes(&e)).expect("a known kind parses");
        let ok = match n {
            "CONN_OPEN" => {
                matches!(c.change, ConnChange::Open(o) if o.dest == "10.0.0.1:443".parse().unwrap())
            }
            "CONN_CLOSE" => c.change == ConnChange::Closed,
            "CONN_SSL" => c.change == ConnChange::Ssl(0x1000),
            _ => return false,
        };
        assert_eq!(c.group, 42, "{n}: the group");
        assert!(ok, "{n} = {v} parsed as {:?}", c.change);
        true
    });
}

#[test]
fn address_families_are_the_kernels() {
    let btf = object_btf();
    for_each_enumerator(&btf, "addr_family", |n, v| {
        let (libc_af, v6) = match n {
            "AF_INET" => (libc::AF_INET, false),
            "AF_INET6" => (libc::AF_INET6, true),
            _ => return false,
        };
        assert_eq!(i64::from(libc_af), v, "{n}");
        let ip = crate::events::ip_from(v as u16, &[0x20; 16]).expect("a known family");
        assert_eq!(ip.is_ipv6(), v6, "{n} reads as the right IP version");
        true
    });
}

#[test]
fn cookies_are_the_kernels() {
    let btf = object_btf();
    let abi = named(btf.type_by_kind::<Enum<'_>>(), "write_abi");
    let value = |name: &str| {
        abi.iter()
            .find(|v| v.name == Some(OsStr::new(name)))
            .unwrap_or_else(|| panic!("{name}"))
            .value as u64
    };
    let mask = value("ABI_MASK");
    for_each_enumerator(&btf, "write_abi", |n, v| {
        let want = match n {
            "ABI_SSL_WRITE" => Some(WriteAbi::SslWrite),
            "ABI_SSL_WRITE_EX" => Some(WriteAbi::SslWriteEx),
            "ABI_GO_TLS_WRITE" => Some(WriteAbi::GoTlsWrite),
            "ABI_GNUTLS_SEND" => Some(WriteAbi::GnutlsSend),
            "ABI_RUSTLS_WRITE" => Some(WriteAbi::RustlsWrite),
            // Not a write ABI: no write probe carries it.
            "ABI_SSL_HANDSHAKE" => None,
            "ABI_MASK" => return true,
            // A flag above the mask: it must not change the ABI a cookie names.
            "ABI_KEYS" => {
                assert_eq!(v as u64 & mask, 0, "ABI_KEYS lies outside ABI_MASK");
                assert_eq!(
                    WriteAbi::from_cookie(WriteAbi::SslWriteEx.cookie() | v as u64),
                    Some(WriteAbi::SslWriteEx)
                );
                return true;
            }
            _ => return false,
        };
        let v = v as u64;
        assert_eq!(WriteAbi::from_cookie(v), want, "{n} = {v}");
        assert_eq!(
            WriteAbi::from_cookie(v | !mask),
            want,
            "{n}: only the bits under ABI_MASK name the ABI"
        );
        if let Some(w) = want {
            assert_eq!(w.cookie(), v, "{n}: the cookie attached");
            assert_eq!(v & !mask, 0, "{n} fits under ABI_MASK");
        }
        true
    });
    for_each_enumerator(&btf, "fd_arg", |n, v| {
        let arg = match n {
            "FD_ARG_RSI" => FdArg::Rsi,
            "FD_ARG_RDX" => FdArg::Rdx,
            _ => return false,
        };
        assert_eq!(arg.cookie(), v as u64, "{n}");
        true
    });
}

#[test]
fn stat_slots_are_the_kernels() {
    let btf = object_btf();
    let mut slots = [0u64; types::stat_idx::ST_MAX.0 as usize];
    for (i, s) in slots.iter_mut().enumerate() {
        *s = 1000 + i as u64;
    }
    let stats = Stats::from_slots(&slots);
    let mut named_slots = 0;
    let mut max = None;
    for_each_enumerator(&btf, "stat_idx", |n, v| {
        let field = match n {
            "ST_WRITES" => stats.writes,
            "ST_BYTES" => stats.bytes,
            "ST_HITS" => stats.hits,
            "ST_UNKNOWN" => stats.unknown,
            "ST_LOST" => stats.lost_events,
            "ST_UNREADABLE" => stats.unreadable,
            "ST_OVERFLOW" => stats.overflow,
            "ST_TAILCALL_FAIL" => stats.tailcall_failures,
            "ST_STOPS" => stats.stops,
            "ST_WRITE_FAIL" => stats.write_failures,
            "ST_HUFFMAN" => stats.huffman_candidates,
            "ST_SPLIT" => stats.splits,
            "ST_WIRE_ARMED" => stats.wire_armed,
            "ST_WIRE_PACKETS" => stats.wire_packets,
            "ST_WIRE_MISS" => stats.wire_misses,
            "ST_WIRE_FULL" => stats.wire_full,
            "ST_WIRE_DROPS" => stats.wire_drops,
            "ST_WIRE_FALLBACK" => stats.wire_fallbacks,
            "ST_WIRE_UNPROVEN" => stats.wire_unproven,
            "ST_REQUIRE_WIRE" => stats.require_wire,
            "ST_DNS_QUERIES" => stats.dns_queries,
            "ST_DNS_ANSWERS" => stats.dns_answers,
            "ST_DNS_MISMATCH" => stats.dns_mismatched,
            "ST_DNS_FOREIGN" => stats.dns_foreign,
            "ST_MAX" => {
                max = Some(v);
                return true;
            }
            _ => return false,
        };
        assert_eq!(field, 1000 + v as u64, "{n} = {v} lands in its Stats field");
        named_slots += 1;
        true
    });
    assert_eq!(max, Some(named_slots), "ST_MAX counts the slots");
    assert_eq!(max, Some(slots.len() as i64), "Rust reads ST_MAX slots");
}
