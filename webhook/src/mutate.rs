//! Pod mutation: every reference to an enabled Secret moves to its shadow
//! (`<name>-kloak`), which holds placeholders instead of values.
//!
//! Pure: given a pod and what the cluster knows about each referenced Secret,
//! it returns the JSON patch, or the reason the pod must be denied. The
//! webhook server wraps it in an AdmissionReview.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Pod};
use serde_json::Value;

pub const ANNOTATION: &str = "getkloak.io/enabled";
pub const SHADOW_SUFFIX: &str = "-kloak";

/// What the webhook knows about a Secret a pod references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretState {
    /// Not labeled for Kloak: left alone.
    NotEnabled,
    /// Enabled and its shadow exists with every key: rewrite to the shadow.
    Ready,
    /// Enabled, but the shadow is missing or incomplete; the reason says which.
    NotReady(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denial {
    #[error(
        "secret {secret:?} is enabled for Kloak but its shadow {:?} is not ready: {reason}",
        shadow_name(secret)
    )]
    ShadowNotReady { secret: String, reason: String },
}

pub fn shadow_name(secret: &str) -> String {
    format!("{secret}{SHADOW_SUFFIX}")
}

fn ptr(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn replace(path: PointerBuf, to: String) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path,
        value: Value::String(to),
    })
}

/// Collects patches, deciding per referenced Secret.
struct Walker<'a> {
    state: &'a dyn Fn(&str) -> SecretState,
    ops: Vec<PatchOperation>,
    denial: Option<Denial>,
}

impl Walker<'_> {
    /// One reference at `path` to Secret `name`.
    fn reference(&mut self, name: &str, path: PointerBuf) {
        match (self.state)(name) {
            SecretState::NotEnabled => {}
            SecretState::Ready => self.ops.push(replace(path, shadow_name(name))),
            SecretState::NotReady(reason) => {
                self.denial.get_or_insert(Denial::ShadowNotReady {
                    secret: name.to_string(),
                    reason,
                });
            }
        }
    }

    fn env_refs(
        &mut self,
        base: &[&str],
        env: Option<&Vec<k8s_openapi::api::core::v1::EnvVar>>,
        env_from: Option<&Vec<k8s_openapi::api::core::v1::EnvFromSource>>,
    ) {
        for (i, e) in env.into_iter().flatten().enumerate() {
            if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
            {
                let i = i.to_string();
                self.reference(
                    &r.name,
                    ptr(&[base, &["env", &i, "valueFrom", "secretKeyRef", "name"]].concat()),
                );
            }
        }
        for (i, e) in env_from.into_iter().flatten().enumerate() {
            if let Some(r) = e.secret_ref.as_ref() {
                let i = i.to_string();
                self.reference(
                    &r.name,
                    ptr(&[base, &["envFrom", &i, "secretRef", "name"]].concat()),
                );
            }
        }
    }

    fn containers(&mut self, field: &str, list: Option<&Vec<Container>>) {
        for (i, c) in list.into_iter().flatten().enumerate() {
            let i = i.to_string();
            self.env_refs(&["spec", field, &i], c.env.as_ref(), c.env_from.as_ref());
        }
    }

    fn ephemeral(&mut self, list: Option<&Vec<EphemeralContainer>>) {
        for (i, c) in list.into_iter().flatten().enumerate() {
            let i = i.to_string();
            self.env_refs(
                &["spec", "ephemeralContainers", &i],
                c.env.as_ref(),
                c.env_from.as_ref(),
            );
        }
    }
}

/// Names of every Secret `pod` references, in any of the places [`mutate`] rewrites.
pub fn referenced_secrets(pod: &Pod) -> std::collections::BTreeSet<String> {
    let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let _ = mutate(pod, &|name| {
        seen.borrow_mut().insert(name.to_string());
        SecretState::NotEnabled
    });
    seen.into_inner()
}

/// The patch that moves `pod` onto shadow Secrets, or why it is denied.
/// Pods that reference no enabled Secret get an empty patch and no annotation.
pub fn mutate(
    pod: &Pod,
    state: &dyn Fn(&str) -> SecretState,
) -> Result<Vec<PatchOperation>, Denial> {
    let mut w = Walker {
        state,
        ops: Vec::new(),
        denial: None,
    };
    if let Some(spec) = &pod.spec {
        for (i, v) in spec.volumes.iter().flatten().enumerate() {
            let i = i.to_string();
            if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) {
                w.reference(name, ptr(&["spec", "volumes", &i, "secret", "secretName"]));
            }
            if let Some(p) = &v.projected {
                for (j, src) in p.sources.iter().flatten().enumerate() {
                    if let Some(s) = &src.secret {
                        let j = j.to_string();
                        w.reference(
                            &s.name,
                            ptr(&[
                                "spec",
                                "volumes",
                                &i,
                                "projected",
                                "sources",
                                &j,
                                "secret",
                                "name",
                            ]),
                        );
                    }
                }
            }
        }
        w.containers("containers", Some(&spec.containers));
        w.containers("initContainers", spec.init_containers.as_ref());
        w.ephemeral(spec.ephemeral_containers.as_ref());
    }
    if let Some(d) = w.denial {
        return Err(d);
    }
    if w.ops.is_empty() {
        return Ok(w.ops);
    }
    let has_annotations = pod.metadata.annotations.is_some();
    w.ops.push(if has_annotations {
        PatchOperation::Add(AddOperation {
            path: ptr(&["metadata", "annotations", ANNOTATION]),
            value: Value::String("true".into()),
        })
    } else {
        PatchOperation::Add(AddOperation {
            path: ptr(&["metadata", "annotations"]),
            value: serde_json::json!({ ANNOTATION: "true" }),
        })
    });
    Ok(w.ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn state(name: &str) -> SecretState {
        match name {
            "api" | "db" => SecretState::Ready,
            "broken" => SecretState::NotReady("shadow api-kloak lacks key token".into()),
            _ => SecretState::NotEnabled,
        }
    }

    /// Applies the patch and returns the pod as JSON.
    fn apply(p: &Pod) -> Value {
        let ops = mutate(p, &state).unwrap();
        let mut doc = serde_json::to_value(p).unwrap();
        json_patch::patch(&mut doc, &ops).unwrap();
        doc
    }

    #[test]
    fn every_kind_of_reference_moves_to_the_shadow() {
        let p = pod(serde_json::json!({
            "volumes": [
                {"name": "a", "secret": {"secretName": "api"}},
                {"name": "b", "projected": {"sources": [{"configMap": {"name": "cm"}}, {"secret": {"name": "db"}}]}},
                {"name": "c", "secret": {"secretName": "other"}}
            ],
            "containers": [{"name": "app", "image": "x",
                "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}},
                        {"name": "PLAIN", "value": "v"}],
                "envFrom": [{"secretRef": {"name": "db"}}]}],
            "initContainers": [{"name": "init", "image": "x",
                "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}}]}],
            "ephemeralContainers": [{"name": "dbg", "image": "x", "envFrom": [{"secretRef": {"name": "api"}}]}]
        }));
        let d = apply(&p);
        assert_eq!(d["spec"]["volumes"][0]["secret"]["secretName"], "api-kloak");
        assert_eq!(
            d["spec"]["volumes"][1]["projected"]["sources"][1]["secret"]["name"],
            "db-kloak"
        );
        assert_eq!(
            d["spec"]["volumes"][2]["secret"]["secretName"], "other",
            "not enabled: untouched"
        );
        let c = &d["spec"]["containers"][0];
        assert_eq!(
            c["env"][0]["valueFrom"]["secretKeyRef"]["name"],
            "api-kloak"
        );
        assert_eq!(c["env"][0]["valueFrom"]["secretKeyRef"]["key"], "token");
        assert_eq!(c["envFrom"][0]["secretRef"]["name"], "db-kloak");
        assert_eq!(
            d["spec"]["initContainers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["name"],
            "api-kloak"
        );
        assert_eq!(
            d["spec"]["ephemeralContainers"][0]["envFrom"][0]["secretRef"]["name"],
            "api-kloak"
        );
        assert_eq!(d["metadata"]["annotations"][ANNOTATION], "true");
    }

    #[test]
    fn referenced_secrets_lists_every_place() {
        let p = pod(serde_json::json!({
            "volumes": [{"name": "a", "secret": {"secretName": "v"}},
                        {"name": "b", "projected": {"sources": [{"secret": {"name": "p"}}]}}],
            "containers": [{"name": "app", "envFrom": [{"secretRef": {"name": "ef"}}]}],
            "initContainers": [{"name": "i", "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "e", "key": "k"}}}]}]
        }));
        let names: Vec<String> = referenced_secrets(&p).into_iter().collect();
        assert_eq!(names, ["e", "ef", "p", "v"]);
    }

    #[test]
    fn existing_annotations_are_kept() {
        let mut p = pod(
            serde_json::json!({"containers": [{"name": "a", "envFrom": [{"secretRef": {"name": "api"}}]}]}),
        );
        p.metadata.annotations = Some([("team".to_string(), "x".to_string())].into());
        let d = apply(&p);
        assert_eq!(d["metadata"]["annotations"]["team"], "x");
        assert_eq!(d["metadata"]["annotations"][ANNOTATION], "true");
    }

    #[test]
    fn pods_without_enabled_secrets_are_untouched() {
        let p = pod(
            serde_json::json!({"containers": [{"name": "a", "envFrom": [{"secretRef": {"name": "other"}}]}]}),
        );
        assert!(mutate(&p, &state).unwrap().is_empty());
    }

    #[test]
    fn a_missing_shadow_denies_with_the_secret_and_reason() {
        let p = pod(serde_json::json!({"containers": [{"name": "a",
            "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "broken", "key": "k"}}}]}]}));
        let e = mutate(&p, &state).unwrap_err().to_string();
        assert!(
            e.contains("\"broken\"")
                && e.contains("\"broken-kloak\"")
                && e.contains("lacks key token"),
            "{e}"
        );
    }
}
