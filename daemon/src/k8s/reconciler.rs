//! The only writer of shadow Secrets. Several node agents run this at once
//! against one API server, so every write carries a precondition (create,
//! replace at the resourceVersion read, delete at uid + resourceVersion) and
//! a conflict means "someone else got there; the next event tells us what
//! they wrote", never "retry harder". A Secret with the shadow's name that
//! Kloak does not manage is never overwritten.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kloak_webhook::mutate::shadow_name;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client};

use crate::k8s::policy;
use crate::k8s::shadow;
use crate::k8s::watch::Key;

pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

pub(crate) struct Reconciler {
    client: Client,
    /// The reason each Secret was last refused, so it is logged once.
    refused: HashMap<Key, String>,
}

impl Reconciler {
    pub(crate) fn new(client: Client) -> Reconciler {
        Reconciler {
            client,
            refused: HashMap::new(),
        }
    }

    /// Brings the shadow of Secret `k` in line with it, or removes it.
    /// `shadows` is the shadow watch's map; what is written is recorded in
    /// it at once.
    pub(crate) async fn reconcile_shadow(
        &mut self,
        k: &Key,
        originals: &BTreeMap<Key, KubeSecret>,
        shadows: &mut BTreeMap<Key, KubeSecret>,
        index: &shadow::Index,
    ) -> Result<(), kube::Error> {
        let (ns, name) = k;
        let shadow_key = (ns.clone(), shadow_name(name));
        let api: Api<KubeSecret> = Api::namespaced(self.client.clone(), ns);
        let Some(orig) = originals.get(k) else {
            return remove_orphan(&api, shadows, k, &shadow_key).await;
        };
        let checked = match policy::check(orig) {
            Ok(c) => c,
            Err(reason) => {
                if self.refused.get(k) != Some(&reason) {
                    tracing::warn!(namespace = %ns, secret = %name, reason = %reason, "Secret is labeled for Kloak but not usable; no placeholders are served for it");
                    self.refused.insert(k.clone(), reason);
                }
                return Ok(());
            }
        };
        self.refused.remove(k);
        let stored = shadows.get(&shadow_key);
        if let Some(s) = stored
            && shadow::settled(orig, &checked, s, index)
            && kloak_webhook::is_managed(&s.metadata)
        {
            return Ok(());
        }
        let others: Vec<&KubeSecret> = shadows
            .iter()
            .filter(|(sk, _)| **sk != shadow_key)
            .map(|(_, s)| s)
            .collect();
        let placeholders = shadow::plan(&checked, stored, &others);
        let mut desired = shadow::build(orig, &placeholders);
        let written = match stored {
            None => match api.create(&PostParams::default(), &desired).await {
                Ok(s) => {
                    tracing::info!(namespace = %ns, secret = %name, keys = placeholders.len(), "shadow Secret created");
                    Some(s)
                }
                // Another node created it first; its watch event brings it here.
                Err(e) if is_status(&e, 409) => {
                    if let Some(s) = api.get_opt(&shadow_key.1).await?
                        && !kloak_webhook::is_managed(&s.metadata)
                    {
                        tracing::warn!(namespace = %ns, secret = %shadow_key.1, "a Secret with the shadow's name exists and is not managed by Kloak; not overwriting it");
                    }
                    None
                }
                Err(e) => return Err(e),
            },
            Some(s) if shadow::up_to_date(s, &desired) => None,
            Some(s) => {
                desired.metadata.resource_version = s.metadata.resource_version.clone();
                match api
                    .replace(&shadow_key.1, &PostParams::default(), &desired)
                    .await
                {
                    Ok(s) => {
                        tracing::info!(namespace = %ns, secret = %name, "shadow Secret updated");
                        Some(s)
                    }
                    // Someone wrote in between; the next event carries their version.
                    Err(e) if is_status(&e, 409) => None,
                    Err(e) => return Err(e),
                }
            }
        };
        if let Some(s) = written {
            // Do not wait for the watch to echo our own write.
            shadows.insert(shadow_key, s);
        }
        Ok(())
    }
}

/// A shadow whose Secret is gone or no longer labeled: delete it, after
/// confirming with the API server that the cache is not merely behind.
async fn remove_orphan(
    api: &Api<KubeSecret>,
    shadows: &mut BTreeMap<Key, KubeSecret>,
    k: &Key,
    shadow_key: &Key,
) -> Result<(), kube::Error> {
    let Some(stored) = shadows.get(shadow_key) else {
        return Ok(());
    };
    if let Some(orig) = api.get_opt(&k.1).await?
        && kloak_webhook::is_enabled(&orig.metadata)
    {
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: stored.metadata.uid.clone(),
            resource_version: stored.metadata.resource_version.clone(),
        }),
        ..Default::default()
    };
    match api.delete(&shadow_key.1, &dp).await {
        Ok(_) => {
            tracing::info!(namespace = %k.0, secret = %k.1, "Secret gone or unlabeled: shadow deleted")
        }
        Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
        Err(e) => return Err(e),
    }
    shadows.remove(shadow_key);
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The reconciler's API traffic against kube's mock service: what it
    //! sends, with which preconditions, and how it takes conflicts.

    use std::time::Duration;

    use http::{Method, Request, Response};
    use kube::client::Body;
    use tower_test::mock;

    use super::*;

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    fn json(code: u16, v: serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&v).unwrap()))
            .unwrap()
    }

    fn status(code: u16, reason: &str) -> Response<Body> {
        json(
            code,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": reason, "code": code, "message": reason}),
        )
    }

    async fn body_json(req: Request<Body>) -> serde_json::Value {
        let bytes = req.into_body().collect_bytes().await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn original(value: &str) -> KubeSecret {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api", "namespace": "ns", "uid": "u-api", "resourceVersion": "5",
                "labels": {"getkloak.io/enabled": "true"}},
            "type": "Opaque",
            "data": {"token": k8s_openapi::ByteString(value.as_bytes().to_vec())},
        }))
        .unwrap()
    }

    fn reconciler() -> (Reconciler, Handle) {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (Reconciler::new(Client::new(svc, "default")), handle)
    }

    fn key() -> Key {
        ("ns".into(), "api".into())
    }

    fn shadow_key() -> Key {
        ("ns".into(), "api-kloak".into())
    }

    #[tokio::test]
    async fn a_missing_shadow_is_created_with_owner_label_and_placeholders() {
        let (mut r, mut h) = reconciler();
        let originals = BTreeMap::from([(key(), original("0123456789abcdef"))]);
        let mut shadows = BTreeMap::new();
        let server = tokio::spawn(async move {
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), Method::POST);
            assert_eq!(req.uri().path(), "/api/v1/namespaces/ns/secrets");
            let body = body_json(req).await;
            send.send_response(json(201, body.clone()));
            body
        });
        r.reconcile_shadow(&key(), &originals, &mut shadows, &shadow::Index::default())
            .await
            .unwrap();
        let body = server.await.unwrap();
        assert_eq!(body["metadata"]["name"], "api-kloak");
        assert_eq!(body["metadata"]["labels"]["getkloak.io/managed"], "true");
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "u-api");
        let p: k8s_openapi::ByteString =
            serde_json::from_value(body["data"]["token"].clone()).unwrap();
        assert_eq!(p.0.len(), 16);
        assert!(p.0.starts_with(b"kloak:"));
        // Recorded at once, without waiting for the watch.
        assert!(shadows.contains_key(&shadow_key()));
    }

    #[tokio::test]
    async fn losing_the_create_race_adopts_instead_of_overwriting() {
        let (mut r, mut h) = reconciler();
        let originals = BTreeMap::from([(key(), original("0123456789abcdef"))]);
        let mut shadows = BTreeMap::new();
        let server = tokio::spawn(async move {
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), Method::POST);
            send.send_response(status(409, "AlreadyExists"));
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), Method::GET);
            assert_eq!(req.uri().path(), "/api/v1/namespaces/ns/secrets/api-kloak");
            send.send_response(json(200, serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "api-kloak", "namespace": "ns", "labels": {"getkloak.io/managed": "true"}}})));
            // Nothing else: no PUT over the winner's placeholders.
            assert!(
                tokio::time::timeout(Duration::from_millis(200), h.next_request())
                    .await
                    .is_err()
            );
        });
        r.reconcile_shadow(&key(), &originals, &mut shadows, &shadow::Index::default())
            .await
            .unwrap();
        server.await.unwrap();
        assert!(!shadows.contains_key(&shadow_key()));
    }

    #[tokio::test]
    async fn an_unmanaged_secret_with_the_shadows_name_is_not_overwritten() {
        let (mut r, mut h) = reconciler();
        let originals = BTreeMap::from([(key(), original("0123456789abcdef"))]);
        let mut shadows = BTreeMap::new();
        let server = tokio::spawn(async move {
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), Method::POST);
            send.send_response(status(409, "AlreadyExists"));
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), Method::GET);
            // Someone's own Secret: no managed label.
            send.send_response(json(
                200,
                serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "api-kloak", "namespace": "ns"}}),
            ));
            assert!(
                tokio::time::timeout(Duration::from_millis(200), h.next_request())
                    .await
                    .is_err()
            );
        });
        r.reconcile_shadow(&key(), &originals, &mut shadows, &shadow::Index::default())
            .await
            .unwrap();
        server.await.unwrap();
        assert!(shadows.is_empty());
    }

    #[tokio::test]
    async fn a_length_change_replaces_at_the_read_resource_version() {
        let (mut r, mut h) = reconciler();
        let originals = BTreeMap::from([(key(), original("0123456789abcdef"))]);
        // Stored for a 10-byte value; the value is 16 bytes now.
        let mut stored = shadow::build(
            &original("0123456789abcdef"),
            &BTreeMap::from([("token".to_string(), "kloak:ABCD".to_string())]),
        );
        stored.metadata.resource_version = Some("41".into());
        stored.metadata.uid = Some("u-shadow".into());
        let mut shadows = BTreeMap::from([(shadow_key(), stored)]);
        let server = tokio::spawn(async move {
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), Method::PUT);
            let body = body_json(req).await;
            assert_eq!(body["metadata"]["resourceVersion"], "41");
            send.send_response(status(409, "Conflict"));
            body
        });
        // A conflict is not an error: the next event brings the newer version.
        r.reconcile_shadow(&key(), &originals, &mut shadows, &shadow::Index::default())
            .await
            .unwrap();
        let body = server.await.unwrap();
        let p: k8s_openapi::ByteString =
            serde_json::from_value(body["data"]["token"].clone()).unwrap();
        assert_eq!(p.0.len(), 16, "re-minted to the new length");
    }

    #[tokio::test]
    async fn an_orphan_is_deleted_with_preconditions_after_checking_the_original() {
        let (mut r, mut h) = reconciler();
        let mut stored = shadow::build(
            &original("0123456789abcdef"),
            &BTreeMap::from([("token".to_string(), "kloak:ABCDEFGHJKMNPQ".to_string())]),
        );
        stored.metadata.resource_version = Some("7".into());
        stored.metadata.uid = Some("u-shadow".into());
        let mut shadows = BTreeMap::from([(shadow_key(), stored)]);
        let server = tokio::spawn(async move {
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(
                (req.method(), req.uri().path()),
                (&Method::GET, "/api/v1/namespaces/ns/secrets/api")
            );
            send.send_response(status(404, "NotFound"));
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), Method::DELETE);
            let body = body_json(req).await;
            assert_eq!(body["preconditions"]["uid"], "u-shadow");
            assert_eq!(body["preconditions"]["resourceVersion"], "7");
            send.send_response(json(
                200,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ));
        });
        r.reconcile_shadow(
            &key(),
            &BTreeMap::new(),
            &mut shadows,
            &shadow::Index::default(),
        )
        .await
        .unwrap();
        server.await.unwrap();
        assert!(shadows.is_empty());
    }
}
