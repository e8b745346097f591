//! Kloak against a real kube-apiserver and etcd on loopback: shadows,
//! convergence of concurrent controllers, admission webhooks called by the
//! API server over TLS, and a "pod" on this host whose writes are
//! rewritten. The controller and the webhook run with a token for a
//! ServiceAccount bound only to the seed's ClusterRole.
//!
//! One test binary, split by topic: each test binary starts its own
//! control plane, and one is enough for all of these.

mod fixtures;
mod pods;
mod restart;
mod shadows;
mod spans;
mod state_file;
mod webhooks;
mod wire;
