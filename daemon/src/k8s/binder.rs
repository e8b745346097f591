//! Which containers on this node may receive which secrets. A pod's
//! containers are bound to exactly the ids of the Secrets (and keys) that
//! pod references in its own namespace, so one pod's placeholders are never
//! replaced with another's secrets. Kept as a diff against what the data
//! path was last told, so a pass sends only the bindings that changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use kloak_storage::TrackedRecord;

use crate::datapath::agent::{Command, Workload};
use crate::k8s::containers::{self, ContainerId, Layout};
use crate::k8s::effects::Effects;
use crate::k8s::pods;
use crate::k8s::publisher::Publisher;
use crate::k8s::watch::{Key, key_of};
use crate::state::mirror::Op as MirrorOp;

/// One container's cgroup, bound to the secrets its pod may receive.
struct Binding {
    pod: Key,
    container: String,
    cgroup: PathBuf,
    ids: HashSet<u32>,
    /// A v1 cgroup: its processes are tracked by pid.
    by_pid: bool,
}

pub(crate) struct Binder {
    /// What each tracked cgroup may receive, as last sent.
    tracked: HashMap<u64, (Key, HashSet<u32>)>,
    /// Container → cgroup (path, id, tracked by pid), once found.
    cgroups: HashMap<ContainerId, (PathBuf, u64, bool)>,
    layout: Layout,
}

/// The ids `pod` may receive: those of the Secrets and keys it references,
/// in its own namespace, that are published now.
pub(crate) fn ids_of_pod(pod: &Pod, publisher: &Publisher) -> HashSet<u32> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let mut ids = HashSet::new();
    for (orig, keys) in pods::secret_refs(pod) {
        ids.extend(publisher.ids_of(ns, &orig, &keys));
    }
    ids
}

impl Binder {
    pub(crate) fn new(layout: Layout) -> Binder {
        Binder {
            tracked: HashMap::new(),
            cgroups: HashMap::new(),
            layout,
        }
    }

    /// Takes over the containers a previous agent tracked, as restored from
    /// the state file, so the first bind changes only what changed
    /// meanwhile. Returns the bindings for the data path to serve until then.
    pub(crate) fn restore(&mut self, tracked: &[TrackedRecord]) -> Effects {
        let mut out = Effects::default();
        for t in tracked {
            let (ns, pod) = t.pod.split_once('/').unwrap_or(("", &t.pod));
            self.tracked.insert(
                t.id,
                ((ns.into(), pod.into()), t.secrets.iter().copied().collect()),
            );
        }
        for t in tracked {
            let (namespace, pod) = t.pod.split_once('/').unwrap_or(("", &t.pod));
            out.commands.push(Command::Track {
                cgroup: t.cgroup.clone(),
                id: t.id,
                secrets: t.secrets.iter().copied().collect(),
                by_pid: t.by_pid,
                workload: Some(Workload {
                    namespace: namespace.into(),
                    pod: pod.into(),
                    container: t.container.clone(),
                }),
            });
        }
        out
    }

    /// Tracks every container of every annotated pod on this node, bound to
    /// the secrets that pod references; untracks the rest.
    pub(crate) fn bind_pods(
        &mut self,
        pods: &BTreeMap<Key, Pod>,
        publisher: &Publisher,
    ) -> Effects {
        let mut want: HashMap<u64, Binding> = HashMap::new();
        for pod in pods
            .values()
            .filter(|p| pods::enabled(p) && p.metadata.deletion_timestamp.is_none())
        {
            let pk = key_of(&pod.metadata);
            let ids = ids_of_pod(pod, publisher);
            let (containers, bad) = pods::container_ids(pod);
            for raw in bad {
                tracing::warn!(namespace = %pk.0, pod = %pk.1, container_id = %raw, "container ID not understood; its processes are not attached");
            }
            for (name, c) in containers {
                let Some((path, id, by_pid)) = self.cgroup_of(&c, &pk) else {
                    continue;
                };
                want.insert(
                    id,
                    Binding {
                        pod: pk.clone(),
                        container: name,
                        cgroup: path,
                        ids: ids.clone(),
                        by_pid,
                    },
                );
            }
        }
        self.settle(want)
    }

    /// Brings what is tracked to `want` (by cgroup id): untracks what is
    /// not wanted, (re)tracks what is new or bound differently.
    fn settle(&mut self, want: HashMap<u64, Binding>) -> Effects {
        let mut out = Effects::default();
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
            out.commands.push(Command::Untrack(id));
            out.mirror.push(MirrorOp::Untracked(id));
        }
        for (id, b) in want {
            if self.tracked.get(&id).is_some_and(|(_, cur)| *cur == b.ids) {
                continue;
            }
            let pk = b.pod;
            if !self.tracked.contains_key(&id) {
                tracing::info!(namespace = %pk.0, pod = %pk.1, cgroup = %b.cgroup.display(), secrets = b.ids.len(), "container attached");
            }
            out.mirror.push(MirrorOp::Tracked(TrackedRecord {
                id,
                cgroup: b.cgroup.clone(),
                by_pid: b.by_pid,
                pod: format!("{}/{}", pk.0, pk.1),
                secrets: b.ids.iter().copied().collect(),
                container: b.container.clone(),
            }));
            self.tracked.insert(id, (pk.clone(), b.ids.clone()));
            out.commands.push(Command::Track {
                cgroup: b.cgroup,
                id,
                secrets: b.ids,
                by_pid: b.by_pid,
                workload: Some(Workload {
                    namespace: pk.0,
                    pod: pk.1,
                    container: b.container,
                }),
            });
        }
        let live: HashSet<u64> = self.tracked.keys().copied().collect();
        self.cgroups.retain(|_, (_, id, _)| live.contains(id));
        out
    }

    fn cgroup_of(&mut self, c: &ContainerId, pod: &Key) -> Option<(PathBuf, u64, bool)> {
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
    //! Which ids each container is bound to, and what is untracked, with a
    //! directory tree standing in for the cgroup hierarchy.

    use std::collections::BTreeSet;

    use kloak_storage::SecretRecord;

    use super::*;

    const CID: &str = "4f9a2b7c1d3e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeef";

    /// Published: ns/api/{token,other} as 1 and 2, ns/db/password as 3.
    fn publisher() -> Publisher {
        let rec = |id, name: &str| SecretRecord {
            id,
            name: name.into(),
            placeholder: "kloak:ABCDEFGHJK".into(),
            value: b"0123456789abcdef".to_vec(),
            hosts: Vec::new(),
            ports: Vec::new(),
            require_wire: false,
        };
        let mut p = Publisher::new();
        p.restore(&[
            rec(1, "ns/api/token"),
            rec(2, "ns/api/other"),
            rec(3, "ns/db/password"),
        ]);
        p
    }

    fn pod(ns: &str, spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": ns, "uid": "u-web",
                "annotations": {kloak_webhook::mutate::ANNOTATION: "true"}},
            "spec": spec,
            "status": {"containerStatuses": [{"name": "app", "image": "app", "imageID": "",
                "ready": true, "restartCount": 0, "containerID": format!("containerd://{CID}")}]},
        }))
        .unwrap()
    }

    fn env_ref(secret: &str, key: &str) -> serde_json::Value {
        serde_json::json!({"containers": [{"name": "app", "env": [{"name": "T",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}]}]})
    }

    fn volume(secret: &str) -> serde_json::Value {
        serde_json::json!({"containers": [{"name": "app"}],
            "volumes": [{"name": "s", "secret": {"secretName": secret}}]})
    }

    #[test]
    fn a_pod_gets_only_the_keys_it_references_in_its_namespace() {
        let p = publisher();
        let ids = |pod: &Pod| ids_of_pod(pod, &p).into_iter().collect::<BTreeSet<_>>();
        assert_eq!(ids(&pod("ns", env_ref("api-kloak", "token"))), [1].into());
        assert_eq!(ids(&pod("ns", volume("api-kloak"))), [1, 2].into());
        assert_eq!(ids(&pod("ns", volume("db-kloak"))), [3].into());
        // The same names in another namespace are other Secrets.
        assert!(ids(&pod("elsewhere", volume("api-kloak"))).is_empty());
        // The original's own name is not a reference to its placeholders.
        assert!(ids(&pod("ns", volume("api"))).is_empty());
    }

    /// A cgroup tree with the container's directory in it.
    fn hierarchy() -> (tempfile::TempDir, Layout, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root
            .path()
            .join("kubepods.slice/kubepods-poduweb.slice")
            .join(format!("cri-containerd-{CID}.scope"));
        std::fs::create_dir_all(&dir).unwrap();
        let layout = Layout {
            unified: Some(root.path().to_path_buf()),
            v1: None,
        };
        (root, layout, dir)
    }

    #[test]
    fn a_pods_container_is_tracked_with_its_ids_and_untracked_when_the_pod_goes() {
        let (_root, layout, dir) = hierarchy();
        let cg = crate::datapath::cgroup::Cgroup::open(&dir).unwrap().id;
        let p = publisher();
        let mut b = Binder::new(layout);
        let mut pods = BTreeMap::from([(
            ("ns".to_string(), "web".to_string()),
            pod("ns", env_ref("api-kloak", "token")),
        )]);
        let e = b.bind_pods(&pods, &p);
        match &e.commands[..] {
            [
                Command::Track {
                    cgroup,
                    id,
                    secrets,
                    by_pid: false,
                    workload: Some(w),
                },
            ] => {
                assert_eq!((cgroup, *id), (&dir, cg));
                assert_eq!(*secrets, HashSet::from([1]));
                assert_eq!(
                    (&*w.namespace, &*w.pod, &*w.container),
                    ("ns", "web", "app")
                );
            }
            _ => panic!("expected one Track"),
        }
        assert!(
            matches!(&e.mirror[..], [MirrorOp::Tracked(t)] if t.id == cg && t.pod == "ns/web" && t.secrets == [1])
        );
        // Unchanged: nothing is sent again.
        assert!(b.bind_pods(&pods, &p).commands.is_empty());
        // Now referencing every key of the Secret: re-sent with both.
        pods.insert(("ns".into(), "web".into()), pod("ns", volume("api-kloak")));
        let e = b.bind_pods(&pods, &p);
        assert!(
            matches!(&e.commands[..], [Command::Track { secrets, .. }] if *secrets == HashSet::from([1, 2]))
        );
        // Being deleted is as good as gone.
        let mut deleting = pod("ns", volume("api-kloak"));
        deleting.metadata.deletion_timestamp =
            serde_json::from_value(serde_json::json!("2024-01-01T00:00:00Z")).unwrap();
        pods.insert(("ns".into(), "web".into()), deleting);
        let e = b.bind_pods(&pods, &p);
        assert!(matches!(e.commands[..], [Command::Untrack(id)] if id == cg));
        assert!(matches!(e.mirror[..], [MirrorOp::Untracked(id)] if id == cg));
        assert!(b.bind_pods(&BTreeMap::new(), &p).commands.is_empty());
    }

    #[test]
    fn a_restored_container_whose_pod_is_gone_is_untracked_on_the_first_bind() {
        let mut b = Binder::new(Layout {
            unified: None,
            v1: None,
        });
        let e = b.restore(&[TrackedRecord {
            id: 42,
            cgroup: "/sys/fs/cgroup/gone".into(),
            by_pid: false,
            pod: "ns/old".into(),
            secrets: vec![1],
            container: "app".into(),
        }]);
        // Served at once, as the previous agent left it.
        assert!(
            matches!(&e.commands[..], [Command::Track { id: 42, workload: Some(w), .. }] if w.pod == "old")
        );
        let e = b.bind_pods(&BTreeMap::new(), &publisher());
        assert!(matches!(e.commands[..], [Command::Untrack(42)]));
        assert!(matches!(e.mirror[..], [MirrorOp::Untracked(42)]));
    }
}
