//! The controller's view of the API: labeled Secrets, their shadows and this
//! node's pods, reconciled into shadows, data-path secrets and bindings.
//!
//! Three watches feed one loop: labeled Secrets, shadow Secrets, and the
//! annotated pods on this node. Every change marks what it touches dirty;
//! the loop then (1) brings each dirty Secret's shadow in line (`shadow`),
//! (2) sends the data path the secrets that changed, and (3) re-binds each
//! pod's containers to exactly the secrets it references. A full pass runs
//! every `--resync` seconds as a safety net, not as the mechanism.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Pod, Secret as KubeSecret};
use kloak_webhook::mutate::shadow_name;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client};
use zeroize::Zeroizing;

use crate::datapath::agent::{Command, Link, Workload};
use crate::datapath::secrets::{Secret, SecretValue};
use crate::k8s::containers::{self, ContainerId, Layout};
use crate::k8s::pods;
use crate::k8s::policy;
use crate::k8s::shadow;
use crate::state::mirror::{Mirror, Op as MirrorOp};
use kloak_storage::{SecretRecord, TrackedRecord};

pub(crate) type Key = (String, String);

pub(crate) fn key_of(meta: &kube::api::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A watch as a map, rebuilt on every (re)list.
pub(crate) struct WatchMap<K> {
    pub(crate) objects: BTreeMap<Key, K>,
    pub(crate) relist: Option<BTreeMap<Key, K>>,
    pub(crate) synced: bool,
}

impl<K: kube::Resource + Clone> WatchMap<K> {
    pub(crate) fn new() -> Self {
        WatchMap {
            objects: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }

    /// Applies one event; returns the keys it touched (all of them on a relist).
    pub(crate) fn apply(&mut self, ev: watcher::Event<K>) -> Vec<Key> {
        match ev {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(o) => {
                let k = key_of(o.meta());
                self.relist.get_or_insert_with(BTreeMap::new).insert(k, o);
                Vec::new()
            }
            watcher::Event::InitDone => {
                let new = self.relist.take().unwrap_or_default();
                let mut keys: BTreeSet<Key> = self.objects.keys().cloned().collect();
                keys.extend(new.keys().cloned());
                self.objects = new;
                self.synced = true;
                keys.into_iter().collect()
            }
            watcher::Event::Apply(o) => {
                let k = key_of(o.meta());
                self.objects.insert(k.clone(), o);
                vec![k]
            }
            watcher::Event::Delete(o) => {
                let k = key_of(o.meta());
                self.objects.remove(&k);
                vec![k]
            }
        }
    }
}

/// What the data path was last given for one secret key.
pub(crate) struct Published {
    pub(crate) placeholder: String,
    pub(crate) value: Zeroizing<Vec<u8>>,
    pub(crate) rules: crate::datapath::rules::Rules,
}

pub(crate) struct State {
    pub(crate) client: Client,
    pub(crate) originals: WatchMap<KubeSecret>,
    pub(crate) shadows: WatchMap<KubeSecret>,
    pub(crate) pods: WatchMap<Pod>,
    /// Stable small ids per (namespace, secret, key), as kernel events carry.
    pub(crate) ids: HashMap<(String, String, String), u32>,
    pub(crate) next_id: u32,
    pub(crate) published: HashMap<u32, Published>,
    /// Published ids per original Secret.
    pub(crate) by_secret: HashMap<Key, BTreeSet<u32>>,
    /// What each tracked cgroup may receive, as last sent.
    pub(crate) tracked: HashMap<u64, (Key, HashSet<u32>)>,
    /// Container → cgroup (path, id, tracked by pid), once found.
    pub(crate) cgroups: HashMap<ContainerId, (PathBuf, u64, bool)>,
    pub(crate) layout: Layout,
    pub(crate) agent: Option<Link>,
    /// The reason each Secret was last refused, so it is logged once.
    pub(crate) refused: HashMap<Key, String>,
    pub(crate) mirror: Option<Mirror>,
    /// The source has been listed once since start: what the state file
    /// restored is now checked against it.
    pub(crate) reconciled: bool,
    /// Secret keys taken out of the data path since start.
    pub(crate) withdrawn: u64,
}

pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl State {
    pub(crate) fn new(client: Client, layout: Layout, agent: Option<Link>) -> State {
        State {
            client,
            originals: WatchMap::new(),
            shadows: WatchMap::new(),
            pods: WatchMap::new(),
            ids: HashMap::new(),
            next_id: 1,
            published: HashMap::new(),
            by_secret: HashMap::new(),
            tracked: HashMap::new(),
            cgroups: HashMap::new(),
            layout,
            agent,
            refused: HashMap::new(),
            mirror: None,
            reconciled: false,
            withdrawn: 0,
        }
    }

    /// Takes over what a previous agent published, as restored from the
    /// state file, so that the first reconcile withdraws what the source
    /// deleted meanwhile and re-sends nothing else.
    pub(crate) fn restore(&mut self, secrets: &[SecretRecord], tracked: &[TrackedRecord]) {
        for r in secrets {
            let mut parts = r.name.splitn(3, '/');
            let (Some(ns), Some(name), Some(key)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            self.ids.insert((ns.into(), name.into(), key.into()), r.id);
            self.next_id = self.next_id.max(r.id + 1);
            self.by_secret
                .entry((ns.into(), name.into()))
                .or_default()
                .insert(r.id);
            if let Ok(rules) = crate::datapath::rules::Rules::parse(&r.hosts, &r.ports) {
                self.published.insert(
                    r.id,
                    Published {
                        placeholder: r.placeholder.clone(),
                        value: Zeroizing::new(r.value.clone()),
                        rules,
                    },
                );
            }
        }
        for t in tracked {
            let (ns, pod) = t.pod.split_once('/').unwrap_or(("", &t.pod));
            self.tracked.insert(
                t.id,
                ((ns.into(), pod.into()), t.secrets.iter().copied().collect()),
            );
        }
    }

    /// Brings the shadow of Secret `k` in line with it, or removes it.
    pub(crate) async fn reconcile_shadow(
        &mut self,
        k: &Key,
        index: &shadow::Index,
    ) -> Result<(), kube::Error> {
        let (ns, name) = k;
        let shadow_key = (ns.clone(), shadow_name(name));
        let api: Api<KubeSecret> = Api::namespaced(self.client.clone(), ns);
        let Some(orig) = self.originals.objects.get(k).cloned() else {
            return self.remove_orphan(&api, k, &shadow_key).await;
        };
        let checked = match policy::check(&orig) {
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
        let stored = self.shadows.objects.get(&shadow_key);
        if let Some(s) = stored
            && shadow::settled(&orig, &checked, s, index)
            && kloak_webhook::is_managed(&s.metadata)
        {
            return Ok(());
        }
        let others: Vec<&KubeSecret> = self
            .shadows
            .objects
            .iter()
            .filter(|(sk, _)| **sk != shadow_key)
            .map(|(_, s)| s)
            .collect();
        let placeholders = shadow::plan(&checked, stored, &others);
        let mut desired = shadow::build(&orig, &placeholders);
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
            self.shadows.objects.insert(shadow_key, s);
        }
        Ok(())
    }

    /// A shadow whose Secret is gone or no longer labeled: delete it, after
    /// confirming with the API server that the cache is not merely behind.
    pub(crate) async fn remove_orphan(
        &mut self,
        api: &Api<KubeSecret>,
        k: &Key,
        shadow_key: &Key,
    ) -> Result<(), kube::Error> {
        let Some(stored) = self.shadows.objects.get(shadow_key) else {
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
        self.shadows.objects.remove(shadow_key);
        Ok(())
    }

    pub(crate) fn id_for(&mut self, ns: &str, name: &str, key: &str) -> u32 {
        let k = (ns.to_string(), name.to_string(), key.to_string());
        if let Some(&id) = self.ids.get(&k) {
            return id;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.ids.insert(k, id);
        id
    }

    /// Sends the data path what changed for Secret `k`.
    pub(crate) fn publish(&mut self, k: &Key) {
        let (ns, name) = k;
        let mut want: BTreeMap<u32, Secret> = BTreeMap::new();
        let mut raw_rules: HashMap<u32, (Vec<String>, Vec<u16>)> = HashMap::new();
        let orig = self.originals.objects.get(k).cloned();
        let shadow = self
            .shadows
            .objects
            .get(&(ns.clone(), shadow_name(name)))
            .cloned();
        if let (Some(orig), Some(shadow)) = (orig, shadow)
            && shadow::owner_uid(&shadow) == orig.metadata.uid.as_deref()
            && let Ok(checked) = policy::check(&orig)
        {
            let data = shadow.data.unwrap_or_default();
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
                    ),
                );
            }
        }
        let before = self.by_secret.remove(k).unwrap_or_default();
        for id in before.iter().filter(|id| !want.contains_key(id)) {
            self.withdrawn += 1;
            tracing::info!(secret = %format!("{ns}/{name}"), id, "secret key withdrawn from the data path");
            self.published.remove(id);
            self.send(Command::RemoveSecret(*id));
            if let Some(m) = &self.mirror {
                m.send(MirrorOp::RemoveSecret(*id));
            }
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
            });
            if same {
                continue;
            }
            tracing::debug!(secret = %s.name, "secret published to the data path");
            if let Some(m) = &self.mirror
                && let Some((hosts, ports)) = raw_rules.get(&id)
            {
                m.send(MirrorOp::Secret(SecretRecord {
                    id,
                    name: s.name.clone(),
                    placeholder: s.placeholder.clone(),
                    value: s.value.expose().to_vec(),
                    hosts: hosts.clone(),
                    ports: ports.clone(),
                }));
            }
            self.published.insert(
                id,
                Published {
                    placeholder: s.placeholder.clone(),
                    value: Zeroizing::new(s.value.expose().to_vec()),
                    rules: s.rules.clone(),
                },
            );
            self.send(Command::PutSecret(s));
        }
    }

    pub(crate) fn send(&self, c: Command) {
        if let Some(link) = &self.agent {
            link.send(c);
        }
    }

    /// Tracks every container of every annotated pod on this node, bound to
    /// the secrets that pod references; untracks the rest.
    pub(crate) fn bind_pods(&mut self) {
        let mut want: HashMap<u64, (Key, String, PathBuf, HashSet<u32>, bool)> = HashMap::new();
        let pods: Vec<Pod> = self
            .pods
            .objects
            .values()
            .filter(|p| pods::enabled(p) && p.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect();
        for pod in &pods {
            let pk = key_of(&pod.metadata);
            let mut ids = HashSet::new();
            for (orig, keys) in pods::secret_refs(pod) {
                for ((ns, name, key), id) in &self.ids {
                    if *ns == pk.0
                        && *name == orig
                        && keys.contains(key)
                        && self.published.contains_key(id)
                    {
                        ids.insert(*id);
                    }
                }
            }
            let (containers, bad) = pods::container_ids(pod);
            for raw in bad {
                tracing::warn!(namespace = %pk.0, pod = %pk.1, container_id = %raw, "container ID not understood; its processes are not attached");
            }
            for (name, c) in containers {
                let Some((path, id, by_pid)) = self.cgroup_of(&c, &pk) else {
                    continue;
                };
                want.insert(id, (pk.clone(), name, path, ids.clone(), by_pid));
            }
        }
        let gone: Vec<u64> = self
            .tracked
            .keys()
            .filter(|id| !want.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            if let Some((pk, _)) = self.tracked.remove(&id) {
                tracing::info!(namespace = %pk.0, pod = %pk.1, cgroup_id = id, "container detached");
            }
            self.send(Command::Untrack(id));
            if let Some(m) = &self.mirror {
                m.send(MirrorOp::Untracked(id));
            }
        }
        for (id, (pk, container, path, ids, by_pid)) in want {
            if self.tracked.get(&id).is_some_and(|(_, cur)| *cur == ids) {
                continue;
            }
            if !self.tracked.contains_key(&id) {
                tracing::info!(namespace = %pk.0, pod = %pk.1, cgroup = %path.display(), secrets = ids.len(), "container attached");
            }
            if let Some(m) = &self.mirror {
                m.send(MirrorOp::Tracked(TrackedRecord {
                    id,
                    cgroup: path.clone(),
                    by_pid,
                    pod: format!("{}/{}", pk.0, pk.1),
                    secrets: ids.iter().copied().collect(),
                    container: container.clone(),
                }));
            }
            self.tracked.insert(id, (pk.clone(), ids.clone()));
            self.send(Command::Track {
                cgroup: path,
                id,
                secrets: ids,
                by_pid,
                workload: Some(Workload {
                    namespace: pk.0.clone(),
                    pod: pk.1.clone(),
                    container,
                }),
            });
        }
        let live: HashSet<u64> = self.tracked.keys().copied().collect();
        self.cgroups.retain(|_, (_, id, _)| live.contains(id));
    }

    pub(crate) fn cgroup_of(&mut self, c: &ContainerId, pod: &Key) -> Option<(PathBuf, u64, bool)> {
        if let Some(found) = self.cgroups.get(c) {
            if found.0.exists() {
                return Some(found.clone());
            }
            self.cgroups.remove(c);
        }
        match containers::find(&self.layout, c) {
            Some(containers::Found {
                unified: Some(path),
                ..
            }) => {
                let id = crate::datapath::cgroup::Cgroup::open(&path).ok()?.id;
                self.cgroups.insert(c.clone(), (path.clone(), id, false));
                Some((path, id, false))
            }
            Some(containers::Found { v1: Some(path), .. }) => {
                // No v2 id for the kernel to match: its processes are
                // tracked by pid, under an id of ours that no cgroup v2
                // inode can take (the top bit).
                let id = crate::datapath::cgroup::Cgroup::open(&path).ok()?.id | 1 << 63;
                self.cgroups.insert(c.clone(), (path.clone(), id, true));
                Some((path, id, true))
            }
            _ => {
                tracing::debug!(namespace = %pod.0, pod = %pod.1, container = %c.id, "container cgroup not found yet");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The reconciler's API traffic against kube's mock service: what it
    //! sends, with which preconditions, and how it takes conflicts.

    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use http::{Method, Request, Response};
    use nix::sys::eventfd::EventFd;

    use super::*;
    use kube::client::Body;
    use tower_test::mock;

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

    fn state() -> (State, Handle) {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let layout = Layout {
            unified: None,
            v1: None,
        };
        let mut st = State::new(Client::new(svc, "default"), layout, None);
        st.originals.synced = true;
        st.shadows.synced = true;
        (st, handle)
    }

    fn key() -> Key {
        ("ns".into(), "api".into())
    }

    #[tokio::test]
    async fn a_missing_shadow_is_created_with_owner_label_and_placeholders() {
        let (mut st, mut h) = state();
        st.originals
            .objects
            .insert(key(), original("0123456789abcdef"));
        let server = tokio::spawn(async move {
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), Method::POST);
            assert_eq!(req.uri().path(), "/api/v1/namespaces/ns/secrets");
            let body = body_json(req).await;
            send.send_response(json(201, body.clone()));
            body
        });
        st.reconcile_shadow(&key(), &shadow::Index::default())
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
        assert!(
            st.shadows
                .objects
                .contains_key(&("ns".into(), "api-kloak".into()))
        );
    }

    #[tokio::test]
    async fn losing_the_create_race_adopts_instead_of_overwriting() {
        let (mut st, mut h) = state();
        st.originals
            .objects
            .insert(key(), original("0123456789abcdef"));
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
        st.reconcile_shadow(&key(), &shadow::Index::default())
            .await
            .unwrap();
        server.await.unwrap();
        assert!(
            !st.shadows
                .objects
                .contains_key(&("ns".into(), "api-kloak".into()))
        );
    }

    #[tokio::test]
    async fn a_length_change_replaces_at_the_read_resource_version() {
        let (mut st, mut h) = state();
        st.originals
            .objects
            .insert(key(), original("0123456789abcdef"));
        // Stored for a 10-byte value; the value is 16 bytes now.
        let old = shadow::build(
            &original("0123456789abcdef"),
            &BTreeMap::from([("token".to_string(), "kloak:ABCD".to_string())]),
        );
        let mut stored = old.clone();
        stored.metadata.resource_version = Some("41".into());
        stored.metadata.uid = Some("u-shadow".into());
        st.shadows
            .objects
            .insert(("ns".into(), "api-kloak".into()), stored);
        let server = tokio::spawn(async move {
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), Method::PUT);
            let body = body_json(req).await;
            assert_eq!(body["metadata"]["resourceVersion"], "41");
            send.send_response(status(409, "Conflict"));
            body
        });
        // A conflict is not an error: the next event brings the newer version.
        st.reconcile_shadow(&key(), &shadow::Index::default())
            .await
            .unwrap();
        let body = server.await.unwrap();
        let p: k8s_openapi::ByteString =
            serde_json::from_value(body["data"]["token"].clone()).unwrap();
        assert_eq!(p.0.len(), 16, "re-minted to the new length");
    }

    #[tokio::test]
    async fn an_orphan_is_deleted_with_preconditions_after_checking_the_original() {
        let (mut st, mut h) = state();
        let mut stored = shadow::build(
            &original("0123456789abcdef"),
            &BTreeMap::from([("token".to_string(), "kloak:ABCDEFGHJKMNPQ".to_string())]),
        );
        stored.metadata.resource_version = Some("7".into());
        stored.metadata.uid = Some("u-shadow".into());
        st.shadows
            .objects
            .insert(("ns".into(), "api-kloak".into()), stored);
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
        st.reconcile_shadow(&key(), &shadow::Index::default())
            .await
            .unwrap();
        server.await.unwrap();
        assert!(st.shadows.objects.is_empty());
    }

    #[test]
    fn published_secrets_follow_the_shadow_and_drop_mid_rotation() {
        let (svc, _h) = mock::pair::<Request<Body>, Response<Body>>();
        let (tx, rx) = mpsc::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _e = rt.enter();
        let wake = Arc::new(EventFd::new().unwrap());
        let mut st = State::new(
            Client::new(svc, "default"),
            Layout {
                unified: None,
                v1: None,
            },
            Some(Link::new(tx, wake)),
        );
        let orig = original("0123456789abcdef");
        st.originals.objects.insert(key(), orig.clone());
        let placeholders = BTreeMap::from([("token".to_string(), "kloak:ABCDEFGHJK".to_string())]);
        let sh = shadow::build(&orig, &placeholders);
        st.shadows
            .objects
            .insert(("ns".into(), "api-kloak".into()), sh);
        st.publish(&key());
        match rx.try_recv().unwrap() {
            Command::PutSecret(s) => {
                assert_eq!(s.placeholder, "kloak:ABCDEFGHJK");
                assert_eq!(s.name, "ns/api/token");
            }
            _ => panic!("expected PutSecret"),
        }
        // Unchanged: nothing is sent again.
        st.publish(&key());
        assert!(rx.try_recv().is_err());
        // The value grows: the old placeholder no longer fits and is withdrawn.
        st.originals
            .objects
            .insert(key(), original("0123456789abcdefXY"));
        st.publish(&key());
        assert!(matches!(rx.try_recv().unwrap(), Command::RemoveSecret(_)));
    }
}
