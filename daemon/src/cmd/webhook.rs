//! `kloak webhook`: serves the admission webhooks with the certificate the
//! controller keeps in a Secret, swapping it in when it changes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use kloak_webhook::server::{Webhook, follow_cert_secret, serve};
use kloak_webhook::tls::CertStore;

use crate::node::tasks::Tasks;

#[derive(clap::Args, Clone)]
pub struct WebhookOpts {
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Namespace of the certificate Secret.
    #[arg(long, env = "KLOAK_NAMESPACE", default_value = "kloak-system")]
    pub namespace: String,
    /// Secret with tls.crt and tls.key, kept by the controller.
    #[arg(long, default_value = "kloak-webhook-tls")]
    pub tls_secret: String,
}

pub async fn run(o: WebhookOpts) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let certs = Arc::new(CertStore::default());
    let tasks = Tasks::new();
    let (c, ns, name, store) = (
        client.clone(),
        o.namespace.clone(),
        o.tls_secret.clone(),
        certs.clone(),
    );
    // Without it a rotated certificate would never be served.
    tasks.spawn("cert-follower", move |_| async move {
        follow_cert_secret(c, ns, name, store).await;
        Ok::<(), String>(())
    });
    let ctx = Arc::new(Webhook {
        client,
        policy: Arc::new(crate::k8s::policy::Policy),
        certs,
    });
    tracing::info!(listen = %o.listen, secret = %format!("{}/{}", o.namespace, o.tls_secret), "kloak webhook starting");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("kloak webhook draining");
    };
    serve(ctx, o.listen, shutdown).await?;
    tokio::task::spawn_blocking(move || tasks.drain(std::time::Duration::from_secs(5))).await?;
    Ok(())
}
