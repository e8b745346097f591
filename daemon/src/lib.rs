//! The node agent's library: the `kloak` binary is a thin front over it,
//! and the benchmarks drive its parts directly.

pub mod admin;
pub mod agent;
pub mod certs;
pub mod cgroup;
pub mod containers;
pub mod controller;
pub mod discover;
pub mod dns;
pub mod doctor;
pub mod guardian;
pub mod hpack;
pub mod metrics;
pub mod mirror;
pub mod pods;
pub mod policy;
pub mod procmem;
pub mod rules;
pub mod run;
pub mod secrets;
pub mod shadow;
pub mod sockets;
pub mod webhook;
