//! What operators see of the node agent: logs (text or JSON, filtered by
//! `RUST_LOG`, level changeable at runtime), and an OpenTelemetry span for
//! every substitution event, exported over OTLP/gRPC without ever slowing
//! the data path.

pub mod audit;
pub mod logging;
pub mod otel;

pub use audit::{Audit, AuditEvent, AuditStats, Outcome, SecretRef, Workload};
pub use logging::{LogFormat, LogHandle};
pub use otel::OtelSettings;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("log filter {directives:?} is not valid: {reason}")]
    Filter { directives: String, reason: String },
    #[error("installing the log subscriber: {0}")]
    Subscriber(String),
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("starting the span export thread: {0}")]
    Thread(#[from] std::io::Error),
}
