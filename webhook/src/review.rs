//! AdmissionReview in, AdmissionReview out. The decisions are pure functions
//! of the request and what the cluster holds; the server fetches the latter.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Resource;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};

use crate::mutate::{self, SecretState, shadow_name};
use crate::{LABEL_MANAGED, SecretPolicy, is_enabled};

/// Whether a pod is Kloak's business: its namespace is labeled, or it
/// carries the label or the annotation itself.
pub fn pod_in_scope(pod: &Pod, namespace_enabled: bool) -> bool {
    let m = &pod.metadata;
    namespace_enabled
        || is_enabled(m)
        || m.annotations
            .as_ref()
            .and_then(|a| a.get(crate::mutate::ANNOTATION))
            .is_some_and(|v| v == "true")
}

/// What a referenced Secret means for the pod, from the original and its
/// shadow as the API server holds them.
pub fn secret_state(
    original: Option<&Secret>,
    shadow: Option<&Secret>,
    policy: &dyn SecretPolicy,
) -> SecretState {
    let Some(orig) = original else {
        // The kubelet reports a missing Secret; nothing for Kloak to hide.
        return SecretState::NotEnabled;
    };
    if !is_enabled(&orig.metadata) {
        return SecretState::NotEnabled;
    }
    if let Err(reason) = policy.check(orig) {
        return SecretState::NotReady(format!("the Secret is not valid for Kloak: {reason}"));
    }
    let Some(shadow) = shadow else {
        return SecretState::NotReady(
            "it does not exist yet; the Kloak controller creates it within seconds".into(),
        );
    };
    let managed = shadow
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MANAGED))
        .is_some_and(|v| v == "true");
    let owned = shadow
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(&o.uid) == orig.metadata.uid.as_ref());
    if !managed || !owned {
        return SecretState::NotReady(format!(
            "it exists but is not managed by Kloak (needs label {LABEL_MANAGED}=true and an owner reference to the Secret)"
        ));
    }
    let empty = BTreeMap::new();
    let shadow_data = shadow.data.as_ref().unwrap_or(&empty);
    for (key, value) in orig.data.as_ref().unwrap_or(&empty) {
        match shadow_data.get(key) {
            None => {
                return SecretState::NotReady(format!("it has no placeholder for key {key:?} yet"));
            }
            Some(p) if p.0.len() != value.0.len() => {
                return SecretState::NotReady(format!(
                    "the placeholder for key {key:?} is being re-minted after a length change"
                ));
            }
            Some(_) => {}
        }
    }
    SecretState::Ready
}

/// Whether this pod request can bring in new Secret references: a CREATE,
/// or `kubectl debug` adding ephemeral containers through their subresource.
pub fn pod_request_mutable(req: &AdmissionRequest<Pod>) -> bool {
    match req.operation {
        Operation::Create => req.sub_resource.is_none(),
        Operation::Update => req.sub_resource.as_deref() == Some("ephemeralcontainers"),
        _ => false,
    }
}

/// Pod CREATE (or ephemeral containers added): the patch onto shadows, or a
/// denial naming the Secret.
/// `states` holds the state of every Secret the pod references.
pub fn review_pod(
    req: &AdmissionRequest<Pod>,
    namespace_enabled: bool,
    states: &BTreeMap<String, SecretState>,
) -> AdmissionResponse {
    let resp = AdmissionResponse::from(req);
    let Some(pod) = &req.object else {
        return resp;
    };
    if !pod_request_mutable(req) || !pod_in_scope(pod, namespace_enabled) {
        return resp;
    }
    let state = |name: &str| states.get(name).cloned().unwrap_or(SecretState::NotEnabled);
    match mutate::mutate(pod, &state) {
        Ok(ops) if ops.is_empty() => resp,
        Ok(ops) => match resp.clone().with_patch(json_patch::Patch(ops)) {
            Ok(r) => r,
            Err(e) => resp.deny(format!("kloak: building the patch failed: {e}")),
        },
        Err(denial) => resp.deny(format!("kloak: {denial}")),
    }
}

/// Secret CREATE/UPDATE: labeled Secrets must be usable by Kloak. Shadows
/// are never validated here (their values are placeholders).
pub fn review_secret(
    req: &AdmissionRequest<Secret>,
    policy: &dyn SecretPolicy,
) -> AdmissionResponse {
    let resp = AdmissionResponse::from(req);
    let Some(secret) = &req.object else {
        return resp;
    };
    if !matches!(req.operation, Operation::Create | Operation::Update)
        || !is_enabled(&secret.metadata)
    {
        return resp;
    }
    let name = secret
        .meta()
        .name
        .clone()
        .unwrap_or_else(|| req.name.clone());
    match policy.check(secret) {
        Ok(warnings) => {
            let mut r = resp;
            if !warnings.is_empty() {
                r.warnings = Some(warnings);
            }
            r
        }
        Err(reason) => resp.deny(format!(
            "kloak: Secret {name:?} is not usable by Kloak: {reason}"
        )),
    }
}

/// Turns a malformed review into the AdmissionReview the API server expects.
pub fn invalid(reason: impl ToString) -> AdmissionReview<DynamicObject> {
    AdmissionResponse::invalid(reason).into_review()
}

/// Name of a shadow for the Secret `name` (re-exported for the server).
pub fn shadow_of(name: &str) -> String {
    shadow_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    struct MinLen;
    impl SecretPolicy for MinLen {
        fn check(&self, s: &Secret) -> Result<Vec<String>, String> {
            for (k, v) in s.data.iter().flatten() {
                if v.0.len() < 8 {
                    return Err(format!("key {k:?} is shorter than 8 bytes"));
                }
            }
            Ok(vec!["no hosts: any destination receives it".into()])
        }
    }

    fn secret(name: &str, labels: &[(&str, &str)], data: &[(&str, &[u8])]) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.metadata.uid = Some(format!("uid-{name}"));
        s.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        s.data = Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                .collect(),
        );
        s
    }

    fn shadow_for(orig: &Secret, data: &[(&str, &[u8])]) -> Secret {
        let mut s = secret("x-kloak", &[(LABEL_MANAGED, "true")], data);
        s.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "Secret".into(),
                name: orig.metadata.name.clone().unwrap(),
                uid: orig.metadata.uid.clone().unwrap(),
                ..Default::default()
            },
        ]);
        s
    }

    const ON: (&str, &str) = (crate::LABEL_ENABLED, "true");

    #[test]
    fn states_follow_label_shadow_and_keys() {
        let p = MinLen;
        let off = secret("x", &[], &[("k", b"0123456789")]);
        assert_eq!(secret_state(Some(&off), None, &p), SecretState::NotEnabled);
        assert_eq!(secret_state(None, None, &p), SecretState::NotEnabled);
        let on = secret("x", &[ON], &[("k", b"0123456789")]);
        assert!(
            matches!(secret_state(Some(&on), None, &p), SecretState::NotReady(r) if r.contains("does not exist"))
        );
        let good = shadow_for(&on, &[("k", b"kloak:ABCD")]);
        assert_eq!(secret_state(Some(&on), Some(&good), &p), SecretState::Ready);
        let short = shadow_for(&on, &[("k", b"kloak:AB")]);
        assert!(
            matches!(secret_state(Some(&on), Some(&short), &p), SecretState::NotReady(r) if r.contains("re-minted"))
        );
        let missing = shadow_for(&on, &[]);
        assert!(
            matches!(secret_state(Some(&on), Some(&missing), &p), SecretState::NotReady(r) if r.contains("\"k\""))
        );
        let mut foreign = good.clone();
        foreign.metadata.owner_references = None;
        assert!(
            matches!(secret_state(Some(&on), Some(&foreign), &p), SecretState::NotReady(r) if r.contains("not managed"))
        );
        let bad = secret("x", &[ON], &[("k", b"short")]);
        assert!(
            matches!(secret_state(Some(&bad), Some(&good), &p), SecretState::NotReady(r) if r.contains("not valid"))
        );
    }

    fn request<T: serde::de::DeserializeOwned + Resource>(
        op: &str,
        kind: &str,
        object: serde_json::Value,
    ) -> AdmissionRequest<T> {
        let review: AdmissionReview<T> = serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u1", "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": kind.to_lowercase() + "s"},
                "name": "n", "namespace": "ns", "operation": op,
                "userInfo": {"username": "test"}, "object": object,
            }
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    #[test]
    fn pod_reviews_patch_deny_or_pass() {
        let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a", "envFrom": [{"secretRef": {"name": "x"}}]}]}});
        let req: AdmissionRequest<Pod> = request("CREATE", "Pod", pod);
        let ready = BTreeMap::from([("x".to_string(), SecretState::Ready)]);
        let r = review_pod(&req, true, &ready);
        assert!(r.allowed);
        let patch: serde_json::Value = serde_json::from_slice(r.patch.as_ref().unwrap()).unwrap();
        assert!(patch.to_string().contains("x-kloak"), "{patch}");
        // Out of scope: untouched even though the Secret is enabled.
        let r = review_pod(&req, false, &ready);
        assert!(r.allowed && r.patch.is_none());
        let not_ready = BTreeMap::from([("x".to_string(), SecretState::NotReady("why".into()))]);
        let r = review_pod(&req, true, &not_ready);
        assert!(!r.allowed);
        // A plain UPDATE cannot add references; ephemeral containers can.
        let mut upd = req.clone();
        upd.operation = Operation::Update;
        assert!(review_pod(&upd, true, &not_ready).allowed);
        upd.sub_resource = Some("ephemeralcontainers".into());
        assert!(!review_pod(&upd, true, &not_ready).allowed);
        assert!(r.result.message.contains("\"x\"") && r.result.message.contains("why"));
    }

    #[test]
    fn secret_reviews_check_only_labeled_secrets() {
        let bad = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s", "labels": {"getkloak.io/enabled": "true"}},
            "data": {"token": "czNjcjN0IQ=="}});
        let r = review_secret(&request("CREATE", "Secret", bad.clone()), &MinLen);
        assert!(!r.allowed);
        assert!(r.result.message.contains("\"s\"") && r.result.message.contains("token"));
        assert!(!r.result.message.contains("s3cr3t!"), "never echo a value");
        let mut unlabeled = bad;
        unlabeled["metadata"]["labels"] = serde_json::json!({});
        assert!(review_secret(&request("CREATE", "Secret", unlabeled), &MinLen).allowed);
        let good = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s", "labels": {"getkloak.io/enabled": "true"}},
            "data": {"token": "MDEyMzQ1Njc4OQ=="}});
        let r = review_secret(&request("UPDATE", "Secret", good), &MinLen);
        assert!(r.allowed);
        assert_eq!(r.warnings.unwrap().len(), 1);
    }
}
