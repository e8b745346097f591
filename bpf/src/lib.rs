//! Kloak's eBPF programs and the safe Rust surface around them.
//!
//! Everything that touches libbpf or raw kernel layouts lives in this crate;
//! callers see [`Probes`], [`Event`] and plain Rust values.
//!
//! The record layouts and every number that crosses the kernel boundary
//! (event kinds, flag bits, stat slots, cookie values, limits) are written
//! once, in `src/bpf/kloak.h`; the skeleton generates Rust types for them
//! from the object's BTF, and this crate reads them from there.

mod skel {
    include!(concat!(env!("OUT_DIR"), "/kloak.skel.rs"));
}
mod verify_skel {
    include!(concat!(env!("OUT_DIR"), "/kloak_verify.skel.rs"));
}

use skel::types;

mod attach;
mod events;
pub mod features;
mod maps;
mod pod;
mod probes;
pub mod sys;

#[cfg(test)]
mod layout_tests;

pub use attach::{FdArg, GoKeyHooks, SocketHooks, WireHook, WriteAbi};
pub use events::{
    Conn, ConnChange, ConnEvent, DnsEvent, Event, EventKind, EventReader, Hit, SplitTail,
};
pub use maps::{MapInfo, SecretEntry, Stats, placeholder_key};
pub use probes::{
    Backend, Config, DnsHook, Probes, TRACEFS, ensure_tracefs, monotonic_ns,
    verify_inplace_programs,
};

/// What every placeholder starts with.
pub const PREFIX: &[u8] = b"kloak:";
/// Length of [`PREFIX`].
pub const PREFIX_LEN: usize = types::kloak_limits::PREFIX_LEN.0 as usize;
/// Shortest secret value (and so placeholder) Kloak accepts.
pub const MIN_SECRET_LEN: usize = types::kloak_limits::MIN_SECRET_LEN.0 as usize;
/// Longest secret value a `secret_map` entry holds.
pub const MAX_SECRET_LEN: usize = types::kloak_limits::MAX_SECRET_LEN.0 as usize;
/// Random characters after the prefix that form the map key.
pub const KEY_LEN: usize = types::kloak_limits::KEY_LEN.0 as usize;
/// Placeholders the kernel handles per write; more go to a user-space scan.
pub const MAX_HITS: usize = types::kloak_limits::MAX_HITS.0 as usize;
/// Default size of the `tls_events` ring buffer.
pub const DEFAULT_RING_BYTES: u32 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the BPF object: {0}")]
    Open(#[source] libbpf_rs::Error),
    #[error("loading the BPF programs (the kernel verifier refused them): {0}")]
    Load(#[source] libbpf_rs::Error),
    #[error("attaching {what}: {source}")]
    Attach {
        what: String,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("updating BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("ring buffer size {0} is not a power of two of at least 4096 bytes")]
    RingSize(u32),
    #[error("polling the tls_events ring buffer: {0}")]
    Poll(#[source] libbpf_rs::Error),
    #[error("tracefs is not mounted at /sys/kernel/tracing and mounting it failed: {0}")]
    Tracefs(#[source] nix::Error),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret entry is invalid: {0}")]
    Entry(&'static str),
}

pub type Result<T> = std::result::Result<T, Error>;
