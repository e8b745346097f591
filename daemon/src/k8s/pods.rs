//! What a pod on this node is entitled to: the shadow Secrets (and keys) it
//! references, and the containers whose processes act for it.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, EnvFromSource, EnvVar, Pod};
use kloak_webhook::mutate::SHADOW_SUFFIX;

use crate::k8s::containers::ContainerId;

/// Which keys of one Secret a pod may receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    All,
    Some(BTreeSet<String>),
}

impl Keys {
    fn widen(&mut self, other: Keys) {
        match (&mut *self, other) {
            (Keys::All, _) => {}
            (_, Keys::All) => *self = Keys::All,
            (Keys::Some(a), Keys::Some(b)) => a.extend(b),
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        match self {
            Keys::All => true,
            Keys::Some(k) => k.contains(key),
        }
    }
}

/// Original Secret name → keys, for every shadow the pod references.
pub fn secret_refs(pod: &Pod) -> BTreeMap<String, Keys> {
    let mut out: BTreeMap<String, Keys> = BTreeMap::new();
    let mut add = |name: &str, keys: Keys| {
        if let Some(orig) = name.strip_suffix(SHADOW_SUFFIX).filter(|o| !o.is_empty()) {
            match out.get_mut(orig) {
                Some(k) => k.widen(keys),
                None => {
                    out.insert(orig.to_string(), keys);
                }
            }
        }
    };
    let items = |items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>| match items {
        Some(items) if !items.is_empty() => {
            Keys::Some(items.iter().map(|i| i.key.clone()).collect())
        }
        _ => Keys::All,
    };
    let Some(spec) = &pod.spec else {
        return out;
    };
    for v in spec.volumes.iter().flatten() {
        if let Some(s) = &v.secret
            && let Some(name) = &s.secret_name
        {
            add(name, items(s.items.as_ref()));
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(s) = &src.secret {
                add(&s.name, items(s.items.as_ref()));
            }
        }
    }
    let mut env = |env: Option<&Vec<EnvVar>>, from: Option<&Vec<EnvFromSource>>| {
        for e in env.into_iter().flatten() {
            if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
            {
                add(&r.name, Keys::Some(BTreeSet::from([r.key.clone()])));
            }
        }
        for f in from.into_iter().flatten() {
            if let Some(r) = &f.secret_ref {
                add(&r.name, Keys::All);
            }
        }
    };
    let containers =
        |list: Option<&Vec<Container>>| list.into_iter().flatten().cloned().collect::<Vec<_>>();
    for c in containers(Some(&spec.containers))
        .iter()
        .chain(containers(spec.init_containers.as_ref()).iter())
    {
        env(c.env.as_ref(), c.env_from.as_ref());
    }
    for c in spec.ephemeral_containers.iter().flatten() {
        env(c.env.as_ref(), c.env_from.as_ref());
    }
    out
}

/// Containers of the pod that have started, by the runtime's ID. IDs that do
/// not parse are returned separately, to be reported.
/// The running containers' IDs, with their names in the pod.
pub fn container_ids(pod: &Pod) -> (Vec<(String, ContainerId)>, Vec<String>) {
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    let Some(st) = &pod.status else {
        return (ok, bad);
    };
    let all = st
        .container_statuses
        .iter()
        .flatten()
        .chain(st.init_container_statuses.iter().flatten())
        .chain(st.ephemeral_container_statuses.iter().flatten());
    for cs in all {
        // A terminated container keeps its ID, but its cgroup is gone.
        let running = cs.state.as_ref().is_none_or(|s| s.terminated.is_none());
        match cs.container_id.as_deref() {
            Some(raw) if running && !raw.is_empty() => match ContainerId::parse(raw) {
                Ok(id) => ok.push((cs.name.clone(), id)),
                Err(_) => bad.push(raw.to_string()),
            },
            _ => {}
        }
    }
    (ok, bad)
}

/// Pods Kloak attaches to: annotated by the webhook (or by hand).
pub fn enabled(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(kloak_webhook::mutate::ANNOTATION))
        .is_some_and(|v| v == "true")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn references_are_narrowed_by_key_and_only_shadows_count() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "volumes": [
                    {"name": "a", "secret": {"secretName": "vol-kloak", "items": [{"key": "k1", "path": "x"}]}},
                    {"name": "b", "projected": {"sources": [{"secret": {"name": "proj-kloak"}}]}},
                    {"name": "c", "secret": {"secretName": "plain"}}
                ],
                "containers": [{"name": "c", "env": [
                    {"name": "A", "valueFrom": {"secretKeyRef": {"name": "env-kloak", "key": "a"}}},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "env-kloak", "key": "b"}}},
                    {"name": "V", "valueFrom": {"secretKeyRef": {"name": "vol-kloak", "key": "k2"}}}
                ]}],
                "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "from-kloak"}}]}],
                "ephemeralContainers": [{"name": "e", "envFrom": [{"secretRef": {"name": "eph-kloak"}}]}]
            }
        }));
        let r = secret_refs(&p);
        let some = |k: &[&str]| Keys::Some(k.iter().map(|s| s.to_string()).collect());
        assert_eq!(r["vol"], some(&["k1", "k2"]));
        assert_eq!(r["proj"], Keys::All);
        assert_eq!(r["env"], some(&["a", "b"]));
        assert_eq!(r["from"], Keys::All);
        assert_eq!(r["eph"], Keys::All);
        assert!(!r.contains_key("plain"));
        assert!(r["env"].contains("a") && !r["env"].contains("c"));
    }

    #[test]
    fn running_containers_only() {
        let id = "a".repeat(64);
        let p = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {
                "containerStatuses": [
                    {"name": "run", "image": "x", "imageID": "", "ready": true, "restartCount": 0,
                     "containerID": format!("containerd://{id}"), "state": {"running": {}}},
                    {"name": "done", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                     "containerID": format!("containerd://{}", "b".repeat(64)),
                     "state": {"terminated": {"exitCode": 0}}},
                    {"name": "bad", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                     "containerID": "weird"}
                ]
            }
        }));
        let (ok, bad) = container_ids(&p);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].1.id, id);
        assert_eq!(bad, ["weird"]);
    }
}
