//! The HTTPS server the API server calls: `/mutate` for pods, `/validate`
//! for Secrets, `/healthz` and `/readyz` for the kubelet.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use kube::runtime::watcher;
use kube::{Api, Client};

use crate::mutate::{SecretState, referenced_secrets};
use crate::review::{self, secret_state, shadow_of};
use crate::tls::CertStore;
use crate::{Error, SecretPolicy, is_enabled};

pub struct Webhook {
    pub client: Client,
    pub policy: Arc<dyn SecretPolicy>,
    pub certs: Arc<CertStore>,
}

type Ctx = Arc<Webhook>;

pub fn router(ctx: Ctx) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(ctx)
}

async fn ready(State(ctx): State<Ctx>) -> (StatusCode, &'static str) {
    if ctx.certs.is_loaded() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no serving certificate yet",
        )
    }
}

async fn mutate(
    State(ctx): State<Ctx>,
    Json(review): Json<AdmissionReview<Pod>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return Json(review::invalid(e)),
    };
    let ns = req.namespace.clone().unwrap_or_else(|| "default".into());
    let resp = match pod_inputs(&ctx, &ns, &req).await {
        Ok((ns_enabled, states)) => review::review_pod(&req, ns_enabled, &states),
        // Fail closed: a pod that might need shadows is not admitted unmutated.
        Err(e) => kube::core::admission::AdmissionResponse::from(&req)
            .deny(format!("kloak: could not read the pod's Secrets: {e}")),
    };
    if !resp.allowed {
        tracing::info!(namespace = %ns, pod = %req.name, reason = %resp.result.message, "pod denied");
    }
    Json(resp.into_review())
}

/// The namespace's opt-in and the state of every Secret the pod references.
async fn pod_inputs(
    ctx: &Webhook,
    ns: &str,
    req: &AdmissionRequest<Pod>,
) -> Result<(bool, BTreeMap<String, SecretState>), kube::Error> {
    let Some(pod) = &req.object else {
        return Ok((false, BTreeMap::new()));
    };
    if !review::pod_request_mutable(req) {
        return Ok((false, BTreeMap::new()));
    }
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let ns_enabled = match namespaces.get_opt(ns).await? {
        Some(n) => is_enabled(&n.metadata),
        None => false,
    };
    if !review::pod_in_scope(pod, ns_enabled) {
        return Ok((false, BTreeMap::new()));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut states = BTreeMap::new();
    for name in referenced_secrets(pod) {
        let original = secrets.get_opt(&name).await?;
        let shadow = match &original {
            Some(o) if is_enabled(&o.metadata) => secrets.get_opt(&shadow_of(&name)).await?,
            _ => None,
        };
        let state = secret_state(original.as_ref(), shadow.as_ref(), ctx.policy.as_ref());
        states.insert(name, state);
    }
    Ok((ns_enabled, states))
}

async fn validate(
    State(ctx): State<Ctx>,
    Json(review): Json<AdmissionReview<Secret>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<Secret> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return Json(review::invalid(e)),
    };
    let resp = review::review_secret(&req, ctx.policy.as_ref());
    if !resp.allowed {
        tracing::info!(namespace = ?req.namespace, secret = %req.name, reason = %resp.result.message, "Secret rejected");
    }
    Json(resp.into_review())
}

/// Keeps `certs` equal to the `tls.crt`/`tls.key` of Secret `name` in
/// `namespace`, for as long as the watch runs.
pub async fn follow_cert_secret(
    client: Client,
    namespace: String,
    name: String,
    certs: Arc<CertStore>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher::watcher(api, cfg).boxed();
    while let Some(ev) = stream.next().await {
        let s = match ev {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "watching the webhook certificate Secret");
                continue;
            }
        };
        let data = s.data.unwrap_or_default();
        let (Some(c), Some(k)) = (data.get("tls.crt"), data.get("tls.key")) else {
            tracing::warn!(secret = %name, "certificate Secret lacks tls.crt or tls.key");
            continue;
        };
        match certs.set_pem(&c.0, &k.0) {
            Ok(true) => tracing::info!(secret = %name, "serving certificate loaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(secret = %name, error = %e, "certificate Secret unusable; keeping the current one")
            }
        }
    }
}

/// Serves until `shutdown` resolves; in-flight reviews finish first.
pub async fn serve(
    ctx: Ctx,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let tls =
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(ctx.certs.server_config()));
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        h.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
    });
    axum_server::bind_rustls(addr, tls)
        .handle(handle)
        .serve(router(ctx).into_make_service())
        .await
        .map_err(|source| Error::Serve { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock;

    struct AnyPolicy;
    impl SecretPolicy for AnyPolicy {
        fn check(&self, _: &Secret) -> Result<Vec<String>, String> {
            Ok(vec![])
        }
    }

    fn json_response(v: serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&v).unwrap()))
            .unwrap()
    }

    fn not_found() -> Response<Body> {
        Response::builder()
            .status(404)
            .body(Body::from(
                serde_json::to_vec(&serde_json::json!({"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}))
                .unwrap(),
            ))
            .unwrap()
    }

    /// The API server as the webhook sees it: a labeled namespace, an
    /// enabled Secret `api` whose shadow is missing.
    async fn apiserver(mut handle: mock::Handle<Request<Body>, Response<Body>>) {
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            let resp = match path.as_str() {
                "/api/v1/namespaces/ns" => json_response(serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "ns", "labels": {"getkloak.io/enabled": "true"}}})),
                "/api/v1/namespaces/ns/secrets/api" => json_response(serde_json::json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "api", "uid": "u", "labels": {"getkloak.io/enabled": "true"}},
                    "data": {"token": "MDEyMzQ1Njc4OQ=="}})),
                _ => not_found(),
            };
            send.send_response(resp);
        }
    }

    #[tokio::test]
    async fn a_missing_shadow_denies_the_pod_naming_the_secret() {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(apiserver(handle));
        let ctx = Arc::new(Webhook {
            client: Client::new(svc, "default"),
            policy: Arc::new(AnyPolicy),
            certs: Arc::default(),
        });
        let review: AdmissionReview<Pod> = serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "ns", "operation": "CREATE", "userInfo": {},
                "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                    "spec": {"containers": [{"name": "a", "env": [{"name": "T",
                        "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}}]}]}}}
        }))
        .unwrap();
        let Json(out) = mutate(State(ctx), Json(review)).await;
        let resp = out.response.unwrap();
        assert!(!resp.allowed);
        assert!(
            resp.result.message.contains("\"api\"")
                && resp.result.message.contains("does not exist"),
            "{}",
            resp.result.message
        );
    }
}
