//! Operating the agent on a node: the admin port (health, readiness,
//! metrics, log level), the doctor's preflight checks, and the supervised
//! background tasks with their readiness holds and drain.

pub mod admin;
pub mod doctor;
pub mod tasks;
