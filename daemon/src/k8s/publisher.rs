//! What the data path holds of each labeled Secret, kept as a diff against
//! what it was last given, so a pass re-sends only what changed and
//! withdraws what is gone. Ids are stable per (namespace, secret, key) and
//! survive restarts through the state file: kernel events and the bindings
//! of running containers carry them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kloak_storage::SecretRecord;
use zeroize::Zeroizing;

use crate::datapath::agent::Command;
use crate::datapath::rules::Rules;
use crate::datapath::secrets::{Secret, SecretValue};
use crate::k8s::effects::Effects;
use crate::k8s::pods::Keys;
use crate::k8s::policy;
use crate::k8s::shadow;
use crate::k8s::watch::Key;
use crate::state::mirror::Op as MirrorOp;

/// What the data path was last given for one secret key.
struct Published {
    placeholder: String,
    value: Zeroizing<Vec<u8>>,
    rules: Rules,
    require_wire: bool,
}

#[derive(Default)]
pub(crate) struct Publisher {
    /// Stable small ids per (namespace, secret, key), as kernel events carry.
    ids: HashMap<(String, String, String), u32>,
    next_id: u32,
    published: HashMap<u32, Published>,
    /// Published ids per original Secret.
    by_secret: HashMap<Key, BTreeSet<u32>>,
    /// Secret keys taken out of the data path since start.
    withdrawn: u64,
}

impl Publisher {
    pub(crate) fn new() -> Publisher {
        Publisher {
            next_id: 1,
            ..Default::default()
        }
    }

    /// Takes over what a previous agent published, as restored from the
    /// state file, so that the first reconcile withdraws what the source
    /// deleted meanwhile and re-sends nothing else. Returns the secrets for
    /// the data path to serve until then.
    pub(crate) fn restore(&mut self, secrets: &[SecretRecord]) -> Effects {
        let mut out = Effects::default();
        for r in secrets {
            let rules = Rules::parse(&r.hosts, &r.ports).ok();
            let mut parts = r.name.splitn(3, '/');
            if let (Some(ns), Some(name), Some(key)) = (parts.next(), parts.next(), parts.next()) {
                self.ids.insert((ns.into(), name.into(), key.into()), r.id);
                self.next_id = self.next_id.max(r.id + 1);
                self.by_secret
                    .entry((ns.into(), name.into()))
                    .or_default()
                    .insert(r.id);
                if let Some(rules) = &rules {
                    self.published.insert(
                        r.id,
                        Published {
                            placeholder: r.placeholder.clone(),
                            value: Zeroizing::new(r.value.clone()),
                            rules: rules.clone(),
                            require_wire: r.require_wire,
                        },
                    );
                }
            }
            if let Some(rules) = rules {
                out.commands.push(Command::PutSecret(
                    Secret::new(
                        r.id,
                        r.name.clone(),
                        SecretValue::new(r.value.clone()),
                        r.placeholder.clone(),
                        rules,
                    )
                    .with_require_wire(r.require_wire),
                ));
            }
        }
        out
    }

    fn id_for(&mut self, ns: &str, name: &str, key: &str) -> u32 {
        let k = (ns.to_string(), name.to_string(), key.to_string());
        if let Some(&id) = self.ids.get(&k) {
            return id;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.ids.insert(k, id);
        id
    }

    /// What changed for Secret `k`, given the original and its shadow as
    /// the watches have them (either may be gone).
    pub(crate) fn publish(
        &mut self,
        k: &Key,
        original: Option<&KubeSecret>,
        shadow: Option<&KubeSecret>,
    ) -> Effects {
        let (ns, name) = k;
        let mut out = Effects::default();
        let mut want: BTreeMap<u32, Secret> = BTreeMap::new();
        let mut raw_rules: HashMap<u32, (Vec<String>, Vec<u16>)> = HashMap::new();
        if let (Some(orig), Some(shadow)) = (original, shadow)
            && shadow::owner_uid(shadow) == orig.metadata.uid.as_deref()
            && let Ok(checked) = policy::check(orig)
        {
            let empty = BTreeMap::new();
            let data = shadow.data.as_ref().unwrap_or(&empty);
            for (key, value) in &checked.values {
                let Some(p) = data.get(key) else { continue };
                // Mid-rotation to a new length: the old placeholder no longer fits.
                if p.0.len() != value.len() {
                    continue;
                }
                let placeholder = String::from_utf8_lossy(&p.0).into_owned();
                let id = self.id_for(ns, name, key);
                raw_rules.insert(id, (checked.hosts.clone(), checked.ports.clone()));
                want.insert(
                    id,
                    Secret::new(
                        id,
                        format!("{ns}/{name}/{key}"),
                        SecretValue::new(value.expose().to_vec()),
                        placeholder,
                        checked.rules.clone(),
                    )
                    .with_require_wire(checked.require_wire),
                );
            }
        }
        let before = self.by_secret.remove(k).unwrap_or_default();
        for id in before.iter().filter(|id| !want.contains_key(id)) {
            self.withdrawn += 1;
            tracing::info!(secret = %format!("{ns}/{name}"), id, "secret key withdrawn from the data path");
            self.published.remove(id);
            out.commands.push(Command::RemoveSecret(*id));
            out.mirror.push(MirrorOp::RemoveSecret(*id));
        }
        if !want.is_empty() {
            self.by_secret
                .insert(k.clone(), want.keys().copied().collect());
        }
        for (id, s) in want {
            let same = self.published.get(&id).is_some_and(|p| {
                p.placeholder == s.placeholder
                    && p.value[..] == *s.value.expose()
                    && p.rules == s.rules
                    && p.require_wire == s.require_wire
            });
            if same {
                continue;
            }
            tracing::debug!(secret = %s.name, "secret published to the data path");
            if let Some((hosts, ports)) = raw_rules.get(&id) {
                out.mirror.push(MirrorOp::Secret(SecretRecord {
                    id,
                    name: s.name.clone(),
                    placeholder: s.placeholder.clone(),
                    value: s.value.expose().to_vec(),
                    hosts: hosts.clone(),
                    ports: ports.clone(),
                    require_wire: s.require_wire,
                }));
            }
            self.published.insert(
                id,
                Published {
                    placeholder: s.placeholder.clone(),
                    value: Zeroizing::new(s.value.expose().to_vec()),
                    rules: s.rules.clone(),
                    require_wire: s.require_wire,
                },
            );
            out.commands.push(Command::PutSecret(s));
        }
        out
    }

    /// The published ids of Secret `name` in `ns` for the keys in `keys`:
    /// what a pod referencing them may receive.
    pub(crate) fn ids_of(&self, ns: &str, name: &str, keys: &Keys) -> HashSet<u32> {
        self.ids
            .iter()
            .filter(|((n, s, key), id)| {
                n == ns && s == name && keys.contains(key) && self.published.contains_key(id)
            })
            .map(|(_, id)| *id)
            .collect()
    }

    /// Every Secret with something in the data path (restored ones included).
    pub(crate) fn secrets(&self) -> impl Iterator<Item = &Key> {
        self.by_secret.keys()
    }

    /// Secret keys in the data path now.
    pub(crate) fn published(&self) -> usize {
        self.published.len()
    }

    /// Secret keys taken out of the data path since start.
    pub(crate) fn withdrawn(&self) -> u64 {
        self.withdrawn
    }
}

#[cfg(test)]
mod tests {
    //! The diff against what was published: what a pass sends the data
    //! path and the state file, read as data.

    use super::*;

    fn original(data: &[(&str, &str)]) -> KubeSecret {
        let data: BTreeMap<&str, k8s_openapi::ByteString> = data
            .iter()
            .map(|(k, v)| (*k, k8s_openapi::ByteString(v.as_bytes().to_vec())))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api", "namespace": "ns", "uid": "u-api", "resourceVersion": "5",
                "labels": {"getkloak.io/enabled": "true"}},
            "type": "Opaque",
            "data": data,
        }))
        .unwrap()
    }

    fn shadow_of(orig: &KubeSecret, placeholders: &[(&str, &str)]) -> KubeSecret {
        let p = placeholders
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        shadow::build(orig, &p)
    }

    fn key() -> Key {
        ("ns".into(), "api".into())
    }

    const TOKEN: &str = "0123456789abcdef";
    const TOKEN_P: &str = "kloak:ABCDEFGHJK";
    const OTHER: &str = "abcdef0123456789";
    const OTHER_P: &str = "kloak:MNPQRSTUVW";

    /// The commands, as (kind, id, placeholder) for reading in assertions.
    fn commands(e: &Effects) -> Vec<(&'static str, u32, String)> {
        e.commands
            .iter()
            .map(|c| match c {
                Command::PutSecret(s) => ("put", s.id, s.placeholder.clone()),
                Command::RemoveSecret(id) => ("remove", *id, String::new()),
                _ => panic!("the publisher sends secrets only"),
            })
            .collect()
    }

    fn ops(e: &Effects) -> Vec<(&'static str, u32)> {
        e.mirror
            .iter()
            .map(|o| match o {
                MirrorOp::Secret(r) => ("secret", r.id),
                MirrorOp::RemoveSecret(id) => ("remove", *id),
                _ => panic!("the publisher records secrets only"),
            })
            .collect()
    }

    #[test]
    fn a_new_key_is_put_and_recorded() {
        let mut p = Publisher::new();
        let orig = original(&[("token", TOKEN)]);
        let sh = shadow_of(&orig, &[("token", TOKEN_P)]);
        let e = p.publish(&key(), Some(&orig), Some(&sh));
        assert_eq!(commands(&e), [("put", 1, TOKEN_P.to_string())]);
        assert_eq!(ops(&e), [("secret", 1)]);
        match &e.mirror[0] {
            MirrorOp::Secret(r) => {
                assert_eq!(r.name, "ns/api/token");
                assert_eq!(r.value, TOKEN.as_bytes());
            }
            _ => unreachable!(),
        }
        assert_eq!(p.published(), 1);
    }

    #[test]
    fn an_unchanged_secret_sends_nothing() {
        let mut p = Publisher::new();
        let orig = original(&[("token", TOKEN)]);
        let sh = shadow_of(&orig, &[("token", TOKEN_P)]);
        p.publish(&key(), Some(&orig), Some(&sh));
        let e = p.publish(&key(), Some(&orig), Some(&sh));
        assert!(e.commands.is_empty());
        assert!(e.mirror.is_empty());
    }

    #[test]
    fn a_new_value_is_put_again_under_the_same_id() {
        let mut p = Publisher::new();
        let orig = original(&[("token", TOKEN)]);
        let sh = shadow_of(&orig, &[("token", TOKEN_P)]);
        p.publish(&key(), Some(&orig), Some(&sh));
        // Same length: the placeholder still fits.
        let rotated = original(&[("token", "fedcba9876543210")]);
        let e = p.publish(&key(), Some(&rotated), Some(&sh));
        assert_eq!(commands(&e), [("put", 1, TOKEN_P.to_string())]);
        assert_eq!(ops(&e), [("secret", 1)]);
        match &e.commands[0] {
            Command::PutSecret(s) => assert_eq!(s.value.expose(), b"fedcba9876543210"),
            _ => unreachable!(),
        }
    }

    #[test]
    fn require_wire_follows_the_annotation_into_the_data_path_and_the_record() {
        let mut p = Publisher::new();
        let plain = original(&[("token", TOKEN)]);
        let sh = shadow_of(&plain, &[("token", TOKEN_P)]);
        p.publish(&key(), Some(&plain), Some(&sh));
        let mut wired = plain.clone();
        wired.metadata.annotations = Some(BTreeMap::from([(
            kloak_webhook::ANN_REQUIRE_WIRE.to_string(),
            "true".to_string(),
        )]));
        // Only the flag changed: sent again, with it.
        let e = p.publish(&key(), Some(&wired), Some(&sh));
        match (&e.commands[..], &e.mirror[..]) {
            ([Command::PutSecret(s)], [MirrorOp::Secret(r)]) => {
                assert!(s.require_wire && r.require_wire);
            }
            _ => panic!("expected one put and one record"),
        }
        assert!(
            p.publish(&key(), Some(&wired), Some(&sh))
                .commands
                .is_empty()
        );
        // A restarted agent serves the restored secret with its flag.
        let restored = match &e.mirror[0] {
            MirrorOp::Secret(r) => r.clone(),
            _ => unreachable!(),
        };
        let e = Publisher::new().restore(&[restored]);
        match &e.commands[..] {
            [Command::PutSecret(s)] => assert!(s.require_wire),
            _ => panic!("expected one put"),
        }
    }

    #[test]
    fn a_gone_key_is_removed_and_its_record_dropped() {
        let mut p = Publisher::new();
        let orig = original(&[("token", TOKEN), ("other", OTHER)]);
        let sh = shadow_of(&orig, &[("token", TOKEN_P), ("other", OTHER_P)]);
        let e = p.publish(&key(), Some(&orig), Some(&sh));
        assert_eq!(e.commands.len(), 2);
        let ids: HashMap<String, u32> = e
            .commands
            .iter()
            .map(|c| match c {
                Command::PutSecret(s) => (s.name.clone(), s.id),
                _ => unreachable!(),
            })
            .collect();
        let (token, other) = (ids["ns/api/token"], ids["ns/api/other"]);
        // One key dropped from the Secret.
        let fewer = original(&[("token", TOKEN)]);
        let e = p.publish(&key(), Some(&fewer), Some(&sh));
        assert_eq!(commands(&e), [("remove", other, String::new())]);
        assert_eq!(ops(&e), [("remove", other)]);
        // The whole Secret deleted.
        let e = p.publish(&key(), None, Some(&sh));
        assert_eq!(commands(&e), [("remove", token, String::new())]);
        assert_eq!(ops(&e), [("remove", token)]);
        assert_eq!(p.published(), 0);
        assert_eq!(p.withdrawn(), 2);
        // Nothing left to withdraw.
        assert!(p.publish(&key(), None, None).commands.is_empty());
    }

    #[test]
    fn a_shadow_of_another_secret_with_the_same_name_publishes_nothing() {
        let mut p = Publisher::new();
        let orig = original(&[("token", TOKEN)]);
        let mut sh = shadow_of(&orig, &[("token", TOKEN_P)]);
        // Left over from an earlier Secret of that name: another owner uid.
        sh.metadata.owner_references.as_mut().unwrap()[0].uid = "u-older".into();
        let e = p.publish(&key(), Some(&orig), Some(&sh));
        assert!(e.commands.is_empty());
    }

    #[test]
    fn published_secrets_follow_the_shadow_and_drop_mid_rotation() {
        let mut p = Publisher::new();
        let orig = original(&[("token", TOKEN)]);
        let sh = shadow_of(&orig, &[("token", TOKEN_P)]);
        let e = p.publish(&key(), Some(&orig), Some(&sh));
        match &e.commands[..] {
            [Command::PutSecret(s)] => {
                assert_eq!(s.placeholder, TOKEN_P);
                assert_eq!(s.name, "ns/api/token");
            }
            _ => panic!("expected PutSecret"),
        }
        // The value grows: the old placeholder no longer fits and is withdrawn.
        let longer = original(&[("token", "0123456789abcdefXY")]);
        let e = p.publish(&key(), Some(&longer), Some(&sh));
        assert!(matches!(e.commands[..], [Command::RemoveSecret(1)]));
    }

    fn record(id: u32, name: &str, placeholder: &str, value: &str) -> SecretRecord {
        SecretRecord {
            id,
            name: name.into(),
            placeholder: placeholder.into(),
            value: value.as_bytes().to_vec(),
            hosts: Vec::new(),
            ports: Vec::new(),
            require_wire: false,
        }
    }

    #[test]
    fn restored_secrets_are_served_then_checked_against_the_source() {
        let mut p = Publisher::new();
        let e = p.restore(&[
            record(7, "ns/api/token", TOKEN_P, TOKEN),
            record(9, "ns/gone/token", OTHER_P, OTHER),
        ]);
        // Served at once, before the API is listed; already in the file.
        assert_eq!(
            commands(&e),
            [
                ("put", 7, TOKEN_P.to_string()),
                ("put", 9, OTHER_P.to_string())
            ]
        );
        assert!(e.mirror.is_empty());
        let mut restored: Vec<&Key> = p.secrets().collect();
        restored.sort();
        assert_eq!(restored, [&key(), &("ns".into(), "gone".into())]);
        // The first reconcile: `api` is unchanged, `gone` was deleted meanwhile.
        let orig = original(&[("token", TOKEN), ("other", OTHER)]);
        let sh = shadow_of(&orig, &[("token", TOKEN_P), ("other", OTHER_P)]);
        let e = p.publish(&key(), Some(&orig), Some(&sh));
        // Only the new key goes out, under an id past every restored one.
        assert_eq!(commands(&e), [("put", 10, OTHER_P.to_string())]);
        let e = p.publish(&("ns".into(), "gone".into()), None, None);
        assert_eq!(commands(&e), [("remove", 9, String::new())]);
        assert_eq!(ops(&e), [("remove", 9)]);
        assert_eq!(p.withdrawn(), 1);
    }

    #[test]
    fn a_pod_may_receive_only_published_keys_of_its_own_namespace() {
        let mut p = Publisher::new();
        let orig = original(&[("token", TOKEN), ("other", OTHER)]);
        let sh = shadow_of(&orig, &[("token", TOKEN_P), ("other", OTHER_P)]);
        p.publish(&key(), Some(&orig), Some(&sh));
        let all = p.ids_of("ns", "api", &Keys::All);
        assert_eq!(all.len(), 2);
        let one = p.ids_of("ns", "api", &Keys::Some(BTreeSet::from(["token".into()])));
        assert_eq!(one.len(), 1);
        assert!(all.is_superset(&one));
        assert!(p.ids_of("elsewhere", "api", &Keys::All).is_empty());
        assert!(p.ids_of("ns", "db", &Keys::All).is_empty());
        // Withdrawn: no longer anyone's.
        p.publish(&key(), None, None);
        assert!(p.ids_of("ns", "api", &Keys::All).is_empty());
    }
}
