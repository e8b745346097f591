//! Kloak's admission webhooks: pods move onto shadow Secrets (`mutate`),
//! labeled Secrets are checked before they are stored (`review`), served
//! over rustls with a certificate that is swapped when it changes (`server`).

pub mod mutate;
pub mod review;
pub mod server;
pub mod tls;

/// Label that opts a Secret, namespace or pod in.
pub const LABEL_ENABLED: &str = "getkloak.io/enabled";
/// Label the controller puts on every shadow Secret.
pub const LABEL_MANAGED: &str = "getkloak.io/managed";
/// Comma-separated hosts a Secret's values may go to.
pub const ANN_HOSTS: &str = "getkloak.io/hosts";
/// Port (or comma-separated ports) a Secret's values may go to.
pub const ANN_PORT: &str = "getkloak.io/port";
/// "true": a Secret's values are served by the wire backend only; where it
/// cannot serve a write, the placeholder goes out unchanged.
pub const ANN_REQUIRE_WIRE: &str = "getkloak.io/require-wire";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("webhook certificate: {0}")]
    Certificate(String),
    #[error("serving the webhook on {addr}: {source}")]
    Serve {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Decides whether a Secret's contents are acceptable to Kloak. The rules
/// (value lengths, hosts, ports, HPACK) live with the data path in the
/// binary; the webhook only asks.
pub trait SecretPolicy: Send + Sync {
    /// Ok with warnings for the user, or the reason it is rejected. The
    /// reason names keys and annotations, never a value.
    fn check(&self, secret: &k8s_openapi::api::core::v1::Secret) -> Result<Vec<String>, String>;
}

pub fn is_enabled(meta: &kube::api::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(LABEL_ENABLED))
        .is_some_and(|v| v == "true")
}

pub fn is_managed(meta: &kube::api::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MANAGED))
        .is_some_and(|v| v == "true")
}
