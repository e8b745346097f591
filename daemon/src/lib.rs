//! The node agent's library: the `kloak` binary is a thin front over it,
//! and the benchmarks drive its parts directly.
//!
//! Grouped by job, each folder depending only on those below it:
//! `cmd` (the subcommands) → `k8s` (the controller's view of the API) and
//! `node` (admin port, doctor, supervised tasks) → `datapath` (kernel events
//! to patched writes) → `state` (the state file's mirror).

pub mod cmd;
pub mod datapath;
pub mod k8s;
pub mod node;
pub mod state;
