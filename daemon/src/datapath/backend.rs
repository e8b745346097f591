//! The backend seam. Every placeholder write is served by exactly one
//! backend, and this is the one place that says which:
//!
//! - `inplace`: the kernel program wrote the value itself
//!   (`bpf_probe_write_user`) and only reports it (`Rewritten`, `Scrubbed`).
//! - `wire`: the write was left alone; tc programs patch its encrypted
//!   records on the wire (`Armed`), or the destination was refused
//!   (`Held`), or the records did not carry the hits as expected
//!   (`WireMiss`). `Decide` stops the writer only until the agent has
//!   decided its destination; nothing is patched in its memory.
//! - `pause`: the kernel program stopped the writing thread; the agent
//!   waits for the whole group, patches, and continues it (`Rewrite`,
//!   `Scrub`, and `Scan`, the full user-space scan the kernel asks for when
//!   it could not read the buffer or found more placeholders than it
//!   tracks; that is also what the pause backend does for writes the
//!   in-place program cannot serve).
//!
//! Which program the kernel runs per write is fixed at load time by
//! [`kloak_bpf::Backend`]; the event kind then tells what actually
//! happened, so events, metrics and spans name the backend that served
//! *that* write, not only the one configured.

use kloak_bpf::EventKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    InPlace,
    Pause,
    Wire,
}

impl BackendKind {
    /// The `backend` label of metrics and spans.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::InPlace => "inplace",
            BackendKind::Pause => "pause",
            BackendKind::Wire => "wire",
        }
    }
}

impl From<kloak_bpf::Backend> for BackendKind {
    fn from(b: kloak_bpf::Backend) -> Self {
        match b {
            kloak_bpf::Backend::InPlace => BackendKind::InPlace,
            kloak_bpf::Backend::Pause => BackendKind::Pause,
            kloak_bpf::Backend::Wire => BackendKind::Wire,
        }
    }
}

/// Secrets with destination rules are the wire's only, under the wire
/// backend. Those rules are a promise the pause fallback cannot keep against
/// a hostile application: a write it serves puts the value into the
/// application's own memory, and an application that wants it there only has
/// to choose a write the wire cannot serve (a CBC suite, a descriptor planted
/// under its `SSL*`, more placeholders than the kernel tracks). The one
/// exception is the network namespace the wire cannot patch in at all (the
/// host's, under the node agent: its pods cross no veth), where pause stays
/// the only way to serve them. `--mode pause` is the explicit choice of pause
/// everywhere. The kernel applies the same rule (`SECRET_WIRE_RULES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WireRules {
    /// The wire backend is loaded.
    pub on: bool,
    /// Inode of the network namespace pause may still serve them in; 0: none.
    pub pause_netns: u32,
    /// When the agent loaded: sockets connected before it (their handshake
    /// unseen, their destination restored from the state file) keep pause.
    pub loaded_ns: u64,
}

impl WireRules {
    /// Whether `s` carries the kernel's `SECRET_WIRE_RULES` flag.
    pub fn flags(self, s: &crate::datapath::secrets::Secret) -> bool {
        self.on && !s.rules.unrestricted()
    }

    /// Whether pause must not serve `s` to process `tgid`: the secret is the
    /// wire's only and the process is outside `pause_netns` (or gone, or its
    /// namespace unreadable).
    /// `connected_ns`: when the write's socket was connected, if known.
    pub fn refuses(
        self,
        s: &crate::datapath::secrets::Secret,
        tgid: u32,
        connected_ns: Option<u64>,
    ) -> bool {
        use std::os::unix::fs::MetadataExt;
        if !self.flags(s) {
            return false;
        }
        if connected_ns.is_some_and(|t| t != 0 && t < self.loaded_ns) {
            return false;
        }
        if self.pause_netns == 0 {
            return true;
        }
        std::fs::metadata(format!("/proc/{tgid}/ns/net"))
            .map(|m| m.ino() != u64::from(self.pause_netns))
            .unwrap_or(true)
    }
}

/// The backend that served (or, for a stopped writer, will serve) a write
/// the kernel reported as `kind`, on a data path loaded with `configured`.
/// Tokens that name no secret, cut placeholders and require-wire secrets the
/// wire could not serve are sent unchanged by whichever backend ran;
/// process events (exec, mmap, exit) are no write.
pub fn serving(configured: kloak_bpf::Backend, kind: EventKind) -> Option<BackendKind> {
    match kind {
        EventKind::Rewritten | EventKind::Scrubbed => Some(BackendKind::InPlace),
        EventKind::Rewrite | EventKind::Scrub | EventKind::Scan => Some(BackendKind::Pause),
        EventKind::Armed | EventKind::Held | EventKind::WireMiss | EventKind::Decide => {
            Some(BackendKind::Wire)
        }
        EventKind::Unknown | EventKind::Split | EventKind::RequireWire => Some(configured.into()),
        EventKind::Exec | EventKind::Mmap | EventKind::Exit => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_kernel_did_names_the_backend() {
        use kloak_bpf::Backend::{InPlace, Pause};
        assert_eq!(
            serving(InPlace, EventKind::Rewritten),
            Some(BackendKind::InPlace)
        );
        // A stop is always the pause backend's, whatever was configured.
        for k in [EventKind::Rewrite, EventKind::Scan, EventKind::Scrub] {
            assert_eq!(serving(InPlace, k), Some(BackendKind::Pause), "{k:?}");
            assert_eq!(serving(Pause, k), Some(BackendKind::Pause), "{k:?}");
        }
        assert_eq!(
            serving(InPlace, EventKind::Unknown),
            Some(BackendKind::InPlace)
        );
        assert_eq!(serving(Pause, EventKind::Split), Some(BackendKind::Pause));
        assert_eq!(serving(Pause, EventKind::Exec), None);
        use kloak_bpf::Backend::Wire;
        for k in [
            EventKind::Armed,
            EventKind::Held,
            EventKind::WireMiss,
            EventKind::Decide,
        ] {
            assert_eq!(serving(Wire, k), Some(BackendKind::Wire), "{k:?}");
        }
        // What the wire cannot serve is paused, and says so.
        assert_eq!(serving(Wire, EventKind::Rewrite), Some(BackendKind::Pause));
        // Unless only the wire may serve it: then nothing is, under either.
        assert_eq!(
            serving(Wire, EventKind::RequireWire),
            Some(BackendKind::Wire)
        );
        assert_eq!(
            serving(Pause, EventKind::RequireWire),
            Some(BackendKind::Pause)
        );
        assert!(!EventKind::RequireWire.leaves_stopped());
        // Every kind that leaves a thread stopped for a write is served by a
        // backend that continues it.
        for k in [EventKind::Rewrite, EventKind::Scan, EventKind::Scrub] {
            assert!(k.leaves_stopped());
        }
    }
}
