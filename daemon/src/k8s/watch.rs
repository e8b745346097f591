//! A watch held as a plain map, so that the reconcile step reads the
//! cluster as it is rather than replaying events: a relist replaces the map
//! whole, which is how objects deleted while the watch was down disappear.

use std::collections::{BTreeMap, BTreeSet};

use kube::runtime::watcher;

/// (namespace, name).
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Secret;

    use super::*;

    fn secret(name: &str) -> Secret {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": "ns"}}))
            .unwrap()
    }

    #[test]
    fn a_relist_drops_what_was_deleted_while_the_watch_was_down() {
        let mut w = WatchMap::new();
        w.apply(watcher::Event::Apply(secret("a")));
        w.apply(watcher::Event::Apply(secret("b")));
        assert!(!w.synced, "events alone are not a listing");
        w.apply(watcher::Event::Init);
        w.apply(watcher::Event::InitApply(secret("b")));
        w.apply(watcher::Event::InitApply(secret("c")));
        // Nothing changes until the listing is complete.
        assert_eq!(w.objects.len(), 2);
        let touched = w.apply(watcher::Event::InitDone);
        assert!(w.synced);
        let names: Vec<&str> = w.objects.keys().map(|k| k.1.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        // The gone one is touched too, so its dependants are revisited.
        let touched: Vec<&str> = touched.iter().map(|k| k.1.as_str()).collect();
        assert_eq!(touched, ["a", "b", "c"]);
    }
}
