//! The data path: kernel events in, patched writes and continued processes
//! out. Knows nothing of Kubernetes: the controller speaks to it through
//! [`agent::Command`].
//!
//! - `agent`: the loop, and the stop → drain again → patch → SIGCONT order;
//! - `backend`: which backend serves each write; `pause`: the lockdown-safe
//!   one; `wire`: decisions and records for the kernel's patches on the wire;
//! - `rewrite`: the secret table, finding placeholders, patching bytes;
//! - `authorise`: bindings, DNS-verified destinations and rules → a decision;
//! - `attach`: tracking containers, attaching to TLS libraries, GC;
//! - `record`: counters, metrics and spans, once per outcome;
//! - `stops`: waiting for a whole thread group to stop; `guardian`: the
//!   process that continues stopped processes when the agent dies;
//! - the rest are the pieces these stand on (DNS cache, rules, ELF
//!   discovery, process memory, cgroups, sockets, HPACK, secrets).

pub mod agent;
pub mod attach;
pub mod authorise;
pub mod backend;
pub mod cgroup;
pub mod discover;
pub mod dns;
pub mod guardian;
pub mod hpack;
pub mod metrics;
pub mod netraw;
pub mod pause;
pub mod procmem;
pub mod record;
pub mod restore;
pub mod rewrite;
pub mod rules;
pub mod secrets;
pub mod sockets;
pub mod stops;
pub mod veths;
pub mod wire;
