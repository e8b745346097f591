//! Shadow Secrets: `<name>-kloak` holds one placeholder per key of `<name>`.
//!
//! The API server is the only record of placeholders, so they survive agent
//! restarts. Every node computes the same plan from the same objects:
//! placeholders are kept while the value's length is unchanged (a rotation
//! reaches the map without a pod restart), re-minted when it changes, and
//! when two shadows clash, the younger one yields. Writes carry preconditions
//! (create-if-absent, resourceVersion), so concurrent nodes converge on
//! whichever write landed first instead of overwriting each other.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kloak_webhook::LABEL_MANAGED;
use kloak_webhook::mutate::shadow_name;
use kube::api::ObjectMeta;

use crate::datapath::secrets::Minted;
use crate::k8s::policy::Checked;

/// Order in which shadows keep a contested placeholder: older first, then by uid.
pub fn seniority(s: &KubeSecret) -> (String, String) {
    (
        s.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| format!("{:?}", t.0))
            .unwrap_or_else(|| "~".into()),
        s.metadata.uid.clone().unwrap_or_default(),
    )
}

/// Placeholders per key for `original`'s shadow. `existing` is the shadow as
/// stored (if any); `others` are every other shadow in the cluster.
pub fn plan(
    checked: &Checked,
    existing: Option<&KubeSecret>,
    others: &[&KubeSecret],
) -> BTreeMap<String, String> {
    let mine = existing.map(seniority);
    let mut minted = Minted::default();
    // Only shadows senior to this one reserve their placeholders against it;
    // juniors re-mint on their side, so both ends agree on who moves.
    for o in others {
        let senior = match &mine {
            Some(m) => seniority(o) < *m,
            None => true,
        };
        if senior {
            for p in o.data.iter().flatten().map(|(_, v)| &v.0) {
                minted.accept(p);
            }
        }
    }
    let stored = existing.and_then(|s| s.data.as_ref());
    let mut out = BTreeMap::new();
    // Keep every still-valid placeholder before minting any new one, so a
    // fresh mint can never take a key a kept placeholder holds.
    let mut pending = Vec::new();
    for (key, value) in &checked.values {
        let keep = stored
            .and_then(|d| d.get(key))
            .map(|p| &p.0)
            .filter(|p| p.len() == value.len() && is_placeholder(p) && minted.accept(p));
        match keep {
            Some(p) => {
                out.insert(key.clone(), String::from_utf8_lossy(p).into_owned());
            }
            None => pending.push(key),
        }
    }
    for key in pending {
        let (p, _) = minted.mint_for(checked.values[key].expose());
        out.insert(key.clone(), p);
    }
    out
}

fn is_placeholder(p: &[u8]) -> bool {
    p.starts_with(kloak_bpf::PREFIX)
        && p[kloak_bpf::PREFIX_LEN..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

/// The shadow object for `original` holding `placeholders`.
pub fn build(original: &KubeSecret, placeholders: &BTreeMap<String, String>) -> KubeSecret {
    let name = original.metadata.name.clone().unwrap_or_default();
    KubeSecret {
        metadata: ObjectMeta {
            name: Some(shadow_name(&name)),
            namespace: original.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([(LABEL_MANAGED.into(), "true".into())])),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Secret".into(),
                name,
                uid: original.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        type_: original.type_.clone(),
        data: Some(
            placeholders
                .iter()
                .map(|(k, p)| (k.clone(), ByteString(p.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Every placeholder in every shadow, for the cheap "nothing to do" check
/// a full resync makes per Secret.
#[derive(Default)]
pub struct Index {
    keys: std::collections::HashMap<[u8; kloak_bpf::KEY_LEN], u32>,
    all: std::collections::BTreeSet<Vec<u8>>,
}

impl Index {
    pub fn build<'a>(shadows: impl IntoIterator<Item = &'a KubeSecret>) -> Index {
        let mut ix = Index::default();
        for s in shadows {
            for p in s.data.iter().flatten().map(|(_, v)| &v.0) {
                if let Some(k) = kloak_bpf::placeholder_key(p) {
                    *ix.keys.entry(k).or_default() += 1;
                    ix.all.insert(p.clone());
                }
            }
        }
        ix
    }

    /// No other shadow's placeholder shares `p`'s map key or prefixes it.
    fn unique(&self, p: &[u8]) -> bool {
        let Some(k) = kloak_bpf::placeholder_key(p) else {
            return false;
        };
        self.keys.get(&k) == Some(&1)
            && !self
                .all
                .range(p.to_vec()..)
                .nth(1)
                .is_some_and(|o| o.starts_with(p))
            && !(kloak_bpf::MIN_SECRET_LEN..p.len()).any(|l| self.all.contains(&p[..l]))
    }
}

/// Whether `stored` is already a correct shadow for `original`: same keys,
/// placeholders as long as the values, uncontested. Then [`plan`] would
/// keep everything and there is nothing to write.
pub fn settled(original: &KubeSecret, checked: &Checked, stored: &KubeSecret, ix: &Index) -> bool {
    let Some(data) = &stored.data else {
        return false;
    };
    owner_uid(stored) == original.metadata.uid.as_deref()
        && stored.type_ == original.type_
        && data.len() == checked.values.len()
        && checked.values.iter().all(|(k, v)| {
            data.get(k)
                .is_some_and(|p| p.0.len() == v.len() && is_placeholder(&p.0) && ix.unique(&p.0))
        })
}

/// Whether the stored shadow already is what `desired` describes.
pub fn up_to_date(stored: &KubeSecret, desired: &KubeSecret) -> bool {
    stored.data == desired.data
        && stored.type_ == desired.type_
        && stored.metadata.owner_references == desired.metadata.owner_references
        && stored
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_MANAGED))
            .is_some_and(|v| v == "true")
}

/// The uid of the Secret a shadow belongs to.
pub fn owner_uid(shadow: &KubeSecret) -> Option<&str> {
    shadow
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Secret" && o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::secrets::SecretValue;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn checked(values: &[(&str, &[u8])]) -> Checked {
        Checked {
            values: values
                .iter()
                .map(|(k, v)| (k.to_string(), SecretValue::new(v.to_vec())))
                .collect(),
            rules: Default::default(),
            hosts: vec![],
            ports: vec![],
            require_wire: false,
            warnings: vec![],
        }
    }

    fn original(name: &str) -> KubeSecret {
        let mut s = KubeSecret::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("ns".into());
        s.metadata.uid = Some(format!("uid-{name}"));
        s.type_ = Some("Opaque".into());
        s
    }

    fn stored(name: &str, placeholders: &BTreeMap<String, String>, created: i64) -> KubeSecret {
        let mut s = build(&original(name), placeholders);
        s.metadata.uid = Some(format!("shadow-{name}"));
        s.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        s
    }

    #[test]
    fn placeholders_are_as_long_as_values_and_stable_across_same_length_rotation() {
        let c = checked(&[
            ("a", b"0123456789"),
            ("b", b"an-api-token-of-32-bytes-long!!!"),
        ]);
        let p = plan(&c, None, &[]);
        assert_eq!(p["a"].len(), 10);
        assert_eq!(p["b"].len(), 32);
        assert!(p["a"].starts_with("kloak:"));
        let s = stored("x", &p, 100);
        // Same lengths, new values: nothing moves.
        let rotated = checked(&[
            ("a", b"9876543210"),
            ("b", b"another-token-also-32-bytes-long"),
        ]);
        assert_eq!(plan(&rotated, Some(&s), &[]), p);
        // A length change re-mints only that key.
        let longer = checked(&[
            ("a", b"0123456789AB"),
            ("b", b"another-token-also-32-bytes-long"),
        ]);
        let q = plan(&longer, Some(&s), &[]);
        assert_eq!(q["a"].len(), 12);
        assert_ne!(q["a"], p["a"]);
        assert_eq!(q["b"], p["b"]);
        // A removed key disappears; a new one is minted.
        let moved = checked(&[("c", b"0123456789")]);
        let r = plan(&moved, Some(&s), &[]);
        assert_eq!(r.keys().collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn the_younger_of_two_clashing_shadows_re_mints() {
        let c = checked(&[("k", b"0123456789abcdef")]);
        let p = plan(&c, None, &[]);
        let old = stored("old", &p, 100);
        let young = stored("young", &p, 200);
        // The old one keeps it even though the young one holds the same.
        assert_eq!(plan(&c, Some(&old), &[&young]), p);
        let moved = plan(&c, Some(&young), &[&old]);
        assert_ne!(moved["k"], p["k"]);
        // A shadow about to be created yields to every existing one.
        assert_ne!(plan(&c, None, &[&old])["k"], p["k"]);
    }

    #[test]
    fn hand_edited_junk_is_replaced() {
        let c = checked(&[("k", b"0123456789")]);
        let junk = BTreeMap::from([("k".to_string(), "not-a-plc".to_string())]);
        let s = stored("x", &junk, 1);
        let p = plan(&c, Some(&s), &[]);
        assert!(p["k"].starts_with("kloak:") && p["k"].len() == 10);
        let desired = build(&original("x"), &p);
        assert!(!up_to_date(&s, &desired));
        let ix = Index::build([&s]);
        assert!(!settled(&original("x"), &c, &s, &ix));
        let good = stored("x", &p, 1);
        assert!(settled(&original("x"), &c, &good, &Index::build([&good])));
        // The same placeholder in a second shadow: no longer settled.
        let twin = stored("y", &p, 2);
        assert!(!settled(
            &original("x"),
            &c,
            &good,
            &Index::build([&good, &twin])
        ));
        assert_eq!(owner_uid(&desired), Some("uid-x"));
        assert_eq!(desired.metadata.name.as_deref(), Some("x-kloak"));
    }
}
