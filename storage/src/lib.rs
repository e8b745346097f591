//! The node agent's durable state: a redb file mirroring what the agent
//! knows — secrets, trusted DNS answers, connection destinations, the
//! containers it tracks with the secrets each pod references (a restarted
//! agent continues their stopped processes first) — so that a restarted
//! agent reloads its maps and keeps serving connections opened before it
//! died.
//!
//! Secret records are sealed with ChaCha20-Poly1305 (ring) under a 32-byte
//! key from a 0600 file, with the table and record key as associated data,
//! so a ciphertext cannot be moved to another slot. The file itself is 0600
//! and by default on tmpfs (`/run/kloak/state.redb`).
//!
//! Whatever is wrong with the file — corrupt, truncated, another key, a
//! newer schema — it is moved aside and a fresh one is started: the agent
//! rebuilds from its source (the Kubernetes API or the secrets file), and
//! never crash-loops on its own state.

mod seal;
mod store;

pub use seal::{Key, KeyError};
pub use store::{
    Batch, ConnKey, ConnRecord, DnsRecord, OpenReport, SCHEMA_VERSION, SecretRecord, Snapshot,
    SslRecord, Store, TrackedRecord,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "state file {path} is in use by another agent ({holder}); only one agent may run per node"
    )]
    Locked {
        path: std::path::PathBuf,
        holder: String,
    },
    #[error("state key: {0}")]
    Key(#[from] KeyError),
    #[error("state file {path}: {what}: {source}")]
    Io {
        path: std::path::PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("state file: {0}")]
    Db(String),
    #[error("state record {table}/{key} cannot be read: {reason}")]
    Record {
        table: &'static str,
        key: String,
        reason: String,
    },
}

impl Error {
    /// The disk (or tmpfs) is full: the agent keeps serving from memory.
    pub fn is_disk_full(&self) -> bool {
        let enospc = |e: &std::io::Error| e.raw_os_error() == Some(nix::libc::ENOSPC);
        match self {
            Error::Io { source, .. } => enospc(source),
            Error::Db(msg) => msg.contains("No space left on device"),
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
