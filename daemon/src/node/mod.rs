//! Operating the agent on a node: the admin port (health, readiness,
//! metrics, log level) and the doctor's preflight checks.

pub mod admin;
pub mod doctor;
