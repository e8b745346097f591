//! The webhook's serving certificate: made here (rcgen), kept in a Secret the
//! webhook pods follow, trusted through the caBundle of the Mutating- and
//! ValidatingWebhookConfiguration, and replaced well before it expires.
//!
//! Every node's controller runs this loop. The Secret is created only if
//! absent and replaced only at the resourceVersion that was read, so one
//! writer wins and the others adopt its certificate. During a rotation the
//! caBundle trusts both the new and the previous CA, because webhook pods
//! pick the new certificate up a little later.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::k8s::reconciler::is_status;

/// When the certificate stops being valid, in Unix seconds.
pub const ANN_NOT_AFTER: &str = "getkloak.io/not-after";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Kubernetes API ({what}): {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
}

#[derive(Debug, Clone)]
pub struct CertOpts {
    pub namespace: String,
    pub secret: String,
    pub webhook_config: String,
    /// DNS names and IP addresses the webhook is reached at.
    pub sans: Vec<String>,
    pub validity: Duration,
}

impl CertOpts {
    /// Renew once less than a third of the validity is left.
    fn renew_before(&self) -> Duration {
        self.validity / 3
    }

    pub fn check_every(&self) -> Duration {
        (self.validity / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
    }
}

pub struct Generated {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: i64,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A fresh CA and a serving certificate for `sans` signed by it.
pub fn generate(sans: &[String], validity: Duration) -> Result<Generated, rcgen::Error> {
    let start = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
    let end = time::OffsetDateTime::now_utc() + validity;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "kloak webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = start;
    ca.not_after = end + time::Duration::days(1);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(sans.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        sans.first().map_or("kloak-webhook", String::as_str),
    );
    leaf.not_before = start;
    leaf.not_after = end;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(Generated {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: end.unix_timestamp(),
    })
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> CertError {
    let what = what.into();
    move |source| CertError::Kube { what, source }
}

/// The first PEM block of a bundle.
fn first_pem(bundle: &str) -> Option<&str> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle.find(END).map(|i| &bundle[..i + END.len()])
}

fn secret_for(opts: &CertOpts, g: &Generated, previous_ca: Option<&str>) -> KubeSecret {
    let mut bundle = g.ca_pem.clone();
    if let Some(prev) = previous_ca {
        bundle.push_str(prev.trim_end());
        bundle.push('\n');
    }
    KubeSecret {
        metadata: ObjectMeta {
            name: Some(opts.secret.clone()),
            namespace: Some(opts.namespace.clone()),
            annotations: Some(BTreeMap::from([(
                ANN_NOT_AFTER.to_string(),
                g.not_after.to_string(),
            )])),
            labels: Some(BTreeMap::from([(
                kloak_webhook::LABEL_MANAGED.to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".into(),
                ByteString(g.cert_pem.clone().into_bytes()),
            ),
            ("tls.key".into(), ByteString(g.key_pem.clone().into_bytes())),
            ("ca.crt".into(), ByteString(bundle.into_bytes())),
        ])),
        ..Default::default()
    }
}

/// Makes sure a valid certificate is stored and trusted; returns the CA
/// bundle now in force.
pub async fn ensure(client: &Client, opts: &CertOpts) -> Result<Vec<u8>, CertError> {
    let api: Api<KubeSecret> = Api::namespaced(client.clone(), &opts.namespace);
    let what = format!("Secret {}/{}", opts.namespace, opts.secret);
    let current = api.get_opt(&opts.secret).await.map_err(kube_err(&what))?;
    let bundle = match current {
        None => {
            let g = generate(&opts.sans, opts.validity)?;
            let s = secret_for(opts, &g, None);
            match api.create(&PostParams::default(), &s).await {
                Ok(_) => tracing::info!(secret = %what, "webhook certificate created"),
                // Another node was first: adopt its certificate.
                Err(e) if is_status(&e, 409) => {}
                Err(e) => return Err(kube_err(&what)(e)),
            }
            api.get(&opts.secret).await.map_err(kube_err(&what))?
        }
        Some(s) => {
            let not_after = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANN_NOT_AFTER))
                .and_then(|v| v.parse::<i64>().ok());
            let complete = s.data.as_ref().is_some_and(|d| {
                ["tls.crt", "tls.key", "ca.crt"]
                    .iter()
                    .all(|k| d.contains_key(*k))
            });
            let due = not_after.is_none_or(|t| t - now() < opts.renew_before().as_secs() as i64);
            if due || !complete {
                let prev = s
                    .data
                    .as_ref()
                    .and_then(|d| d.get("ca.crt"))
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned());
                let g = generate(&opts.sans, opts.validity)?;
                let mut new = secret_for(opts, &g, prev.as_deref().and_then(first_pem));
                new.metadata.resource_version = s.metadata.resource_version.clone();
                // Keep what others put there (a Helm release owning the
                // Secret marks it so); ours win where both set a key.
                for (mine, theirs) in [
                    (&mut new.metadata.labels, &s.metadata.labels),
                    (&mut new.metadata.annotations, &s.metadata.annotations),
                ] {
                    let mut merged = theirs.clone().unwrap_or_default();
                    merged.extend(mine.take().unwrap_or_default());
                    *mine = Some(merged);
                }
                match api
                    .replace(&opts.secret, &PostParams::default(), &new)
                    .await
                {
                    Ok(_) => tracing::info!(secret = %what, "webhook certificate rotated"),
                    Err(e) if is_status(&e, 409) => {}
                    Err(e) => return Err(kube_err(&what)(e)),
                }
                api.get(&opts.secret).await.map_err(kube_err(&what))?
            } else {
                s
            }
        }
    };
    let ca = bundle
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .map(|b| b.0.clone())
        .unwrap_or_default();
    patch_ca_bundle(client, &opts.webhook_config, &ca).await?;
    Ok(ca)
}

/// Sets the caBundle of every webhook in the mutating and the validating
/// configuration of that name to `ca`. A configuration that does not exist
/// (not installed, or installed without one) is skipped.
async fn patch_ca_bundle(client: &Client, name: &str, ca: &[u8]) -> Result<(), CertError> {
    patch_kind::<MutatingWebhookConfiguration>(client, name, ca, |c| {
        c.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config)
            .collect()
    })
    .await?;
    patch_kind::<ValidatingWebhookConfiguration>(client, name, ca, |c| {
        c.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config)
            .collect()
    })
    .await
}

async fn patch_kind<K>(
    client: &Client,
    name: &str,
    ca: &[u8],
    configs: impl Fn(&mut K) -> Vec<&mut WebhookClientConfig>,
) -> Result<(), CertError>
where
    K: kube::Resource<Scope = kube::core::ClusterResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::all(client.clone());
    let what = format!("{} {name}", K::kind(&()));
    for _ in 0..5 {
        let cfg = match api.get_opt(name).await {
            Ok(c) => c,
            // The seed's ClusterRole covers only the mutating kind; the
            // other configuration's caBundle is then the operator's job.
            Err(e) if is_status(&e, 403) => {
                tracing::warn!(config = %what, "no permission to read it; its caBundle is not kept (grant get and update on it)");
                return Ok(());
            }
            Err(e) => return Err(kube_err(&what)(e)),
        };
        let Some(mut cfg) = cfg else {
            tracing::warn!(config = %what, "webhook configuration not found; not registered yet");
            return Ok(());
        };
        let mut changed = false;
        for c in configs(&mut cfg) {
            if c.ca_bundle.as_ref().map(|b| &b.0[..]) != Some(ca) {
                c.ca_bundle = Some(ByteString(ca.to_vec()));
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        match api.replace(name, &PostParams::default(), &cfg).await {
            Ok(_) => {
                tracing::info!(config = %what, "webhook caBundle updated");
                return Ok(());
            }
            Err(e) if is_status(&e, 409) => continue,
            Err(e) => return Err(kube_err(&what)(e)),
        }
    }
    Ok(())
}

/// Keeps the certificate valid and trusted for as long as the controller runs.
pub async fn run(client: Client, opts: CertOpts, ready: tokio::sync::watch::Sender<bool>) {
    loop {
        match ensure(&client, &opts).await {
            Ok(_) => {
                let _ = ready.send(true);
            }
            Err(e) => tracing::warn!(error = %e, "webhook certificate upkeep failed; retrying"),
        }
        tokio::time::sleep(opts.check_every()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_chain_to_their_ca() {
        let g = generate(
            &["kloak-webhook.kloak.svc".into(), "127.0.0.1".into()],
            Duration::from_secs(3600),
        )
        .unwrap();
        assert!(g.ca_pem.contains("BEGIN CERTIFICATE"));
        assert!(g.key_pem.contains("PRIVATE KEY"));
        assert!((g.not_after - now() - 3600).abs() < 5);
        // rustls accepts it for the IP SAN when the CA is the only root.
        let mut roots = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        roots
            .add(rustls_pki_types::CertificateDer::from_pem_slice(g.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            rustls::crypto::ring::default_provider().into(),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let leaf = rustls_pki_types::CertificateDer::from_pem_slice(g.cert_pem.as_bytes()).unwrap();
        for name in ["127.0.0.1", "kloak-webhook.kloak.svc"] {
            verifier
                .verify_server_cert(
                    &leaf,
                    &[],
                    &rustls_pki_types::ServerName::try_from(name).unwrap(),
                    &[],
                    rustls_pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn a_bundle_keeps_only_the_previous_ca() {
        let a = generate(&["a".into()], Duration::from_secs(60)).unwrap();
        let b = generate(&["a".into()], Duration::from_secs(60)).unwrap();
        let opts = CertOpts {
            namespace: "n".into(),
            secret: "s".into(),
            webhook_config: "w".into(),
            sans: vec![],
            validity: Duration::from_secs(60),
        };
        let two = format!("{}{}", a.ca_pem, b.ca_pem);
        let s = secret_for(&opts, &b, first_pem(&two));
        let bundle = String::from_utf8(s.data.unwrap()["ca.crt"].0.clone()).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(bundle.starts_with(&b.ca_pem));
        assert!(bundle.contains(a.ca_pem.trim_end()));
        assert_eq!(opts.renew_before(), Duration::from_secs(20));
    }
}
