//! Kloak's admission webhooks. The mutation itself is pure (`mutate`); the
//! HTTPS server and the validating webhook come with the Kubernetes issue.

pub mod mutate;
