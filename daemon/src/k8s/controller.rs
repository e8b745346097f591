//! The controller's view of the API: labeled Secrets, their shadows and this
//! node's pods, reconciled into shadows, data-path secrets and bindings.
//!
//! Three watches feed one loop: labeled Secrets, shadow Secrets, and the
//! annotated pods on this node. Every change marks what it touches dirty;
//! the loop then (1) brings each dirty Secret's shadow in line
//! (`reconciler`), (2) sends the data path the secrets that changed
//! (`publisher`), and (3) re-binds each pod's containers to exactly the
//! secrets it references (`binder`), in that order: a pod is bound only to
//! what is already published. A full pass runs every `--resync` seconds as
//! a safety net, not as the mechanism.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret as KubeSecret};
use kloak_storage::Snapshot;
use kloak_webhook::mutate::{SHADOW_SUFFIX, shadow_name};
use kloak_webhook::{LABEL_ENABLED, LABEL_MANAGED};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::datapath::agent::{Command, Link, Restored};
use crate::k8s::binder::Binder;
use crate::k8s::containers::Layout;
use crate::k8s::effects::Effects;
use crate::k8s::publisher::Publisher;
use crate::k8s::reconciler::Reconciler;
use crate::k8s::shadow;
use crate::k8s::watch::{Key, WatchMap};
use crate::state::mirror::Mirror;

/// What the loop reports as it goes; the admin port's health, kept out of
/// `k8s` so the controller does not depend on how it is served.
pub(crate) trait Readiness {
    /// One pass over dirty Secrets took `took`.
    fn pass_done(&self, took: Duration);
    /// The source has been listed once and what was restored checked against it.
    fn reconciled(&self);
    fn is_datapath_ready(&self) -> bool;
    /// The data path serves from now on; `after` is the time since start.
    fn datapath_ready(&self, after: Duration);
}

/// How the loop runs.
pub(crate) struct LoopOpts {
    /// This node; only its pods are watched.
    pub(crate) node: String,
    pub(crate) resync: Duration,
    /// When the agent started, for the times readiness reports.
    pub(crate) started: Instant,
}

pub(crate) struct Controller {
    client: Client,
    originals: WatchMap<KubeSecret>,
    shadows: WatchMap<KubeSecret>,
    pods: WatchMap<Pod>,
    reconciler: Reconciler,
    publisher: Publisher,
    binder: Binder,
    agent: Option<Link>,
    mirror: Option<Mirror>,
    /// The source has been listed once since start: what the state file
    /// restored is now checked against it.
    reconciled: bool,
}

fn original_of(shadow: &Key) -> Option<Key> {
    let (ns, n) = shadow;
    n.strip_suffix(SHADOW_SUFFIX)
        .map(|o| (ns.clone(), o.to_string()))
}

impl Controller {
    pub(crate) fn new(
        client: Client,
        layout: Layout,
        agent: Option<Link>,
        mirror: Option<Mirror>,
    ) -> Controller {
        Controller {
            reconciler: Reconciler::new(client.clone()),
            client,
            originals: WatchMap::new(),
            shadows: WatchMap::new(),
            pods: WatchMap::new(),
            publisher: Publisher::new(),
            binder: Binder::new(layout),
            agent,
            mirror,
            reconciled: false,
        }
    }

    fn deliver(&self, e: Effects) {
        e.deliver(self.agent.as_ref(), self.mirror.as_ref());
    }

    fn send(&self, c: Command) {
        if let Some(link) = &self.agent {
            link.send(c);
        }
    }

    /// Answers once the data path has applied everything sent before it;
    /// an error when there is no data path to answer.
    fn barrier(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Barrier(tx));
        rx
    }

    /// Serves what the state file held, before the API is asked: secrets,
    /// then what processes knew, then the bindings. Returns what the data
    /// path loaded, once it has applied all of it (None: it never did).
    pub(crate) async fn restore(&mut self, snap: Snapshot) -> Option<Restored> {
        let e = self.publisher.restore(&snap.secrets);
        self.deliver(e);
        // The maps first, then the probes: a write that meets the probe
        // finds its connection already known.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        self.send(Command::Restore {
            dns: snap.dns,
            conns: snap.conns,
            ssl: snap.ssl,
            done: Some(done_tx),
        });
        let e = self.binder.restore(&snap.tracked);
        self.deliver(e);
        let barrier = self.barrier();
        let loaded = done_rx.await.unwrap_or_default();
        barrier.await.is_ok().then_some(loaded)
    }

    /// Watches the API until SIGTERM or SIGINT, reconciling as it changes.
    pub(crate) async fn run(
        &mut self,
        opts: &LoopOpts,
        ready: &impl Readiness,
    ) -> std::io::Result<()> {
        let secrets: Api<KubeSecret> = Api::all(self.client.clone());
        let pods_api: Api<Pod> = Api::all(self.client.clone());
        let mut originals = watcher(
            secrets.clone(),
            watcher::Config::default().labels(&format!("{LABEL_ENABLED}=true")),
        )
        .default_backoff()
        .boxed();
        let mut shadows = watcher(
            secrets,
            watcher::Config::default().labels(&format!("{LABEL_MANAGED}=true")),
        )
        .default_backoff()
        .boxed();
        let mut pod_events = watcher(
            pods_api,
            watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node)),
        )
        .default_backoff()
        .boxed();
        let mut tick = tokio::time::interval(opts.resync);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

        loop {
            let mut dirty: BTreeSet<Key> = BTreeSet::new();
            let mut pods_dirty = false;
            tokio::select! {
                Some(ev) = originals.next() => match ev {
                    Ok(ev) => dirty.extend(self.originals.apply(ev)),
                    Err(e) => tracing::warn!(error = %e, "watching labeled Secrets"),
                },
                Some(ev) = shadows.next() => match ev {
                    Ok(ev) => dirty.extend(self.shadows.apply(ev).iter().filter_map(original_of)),
                    Err(e) => tracing::warn!(error = %e, "watching shadow Secrets"),
                },
                Some(ev) = pod_events.next() => match ev {
                    Ok(ev) => { self.pods.apply(ev); pods_dirty = true; }
                    Err(e) => tracing::warn!(error = %e, "watching this node's pods"),
                },
                _ = tick.tick() => {
                    dirty.extend(self.originals.objects.keys().cloned());
                    dirty.extend(self.shadows.objects.keys().filter_map(original_of));
                    pods_dirty = true;
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
            self.pass(dirty, pods_dirty, opts, ready).await;
        }
        Ok(())
    }

    /// One pass over what changed: shadows, then the data path's secrets,
    /// then the bindings.
    async fn pass(
        &mut self,
        mut dirty: BTreeSet<Key>,
        mut pods_dirty: bool,
        opts: &LoopOpts,
        ready: &impl Readiness,
    ) {
        if !self.originals.synced || !self.shadows.synced {
            return;
        }
        let first = !self.reconciled;
        if first {
            // The source is the truth: what the state file restored for
            // Secrets deleted while the agent was down goes now.
            self.reconciled = true;
            dirty.extend(self.publisher.secrets().cloned());
            pods_dirty = true;
        }
        let pass = Instant::now();
        let index = shadow::Index::build(self.shadows.objects.values());
        let withdrawn_before = self.publisher.withdrawn();
        for k in &dirty {
            if let Err(e) = self
                .reconciler
                .reconcile_shadow(
                    k,
                    &self.originals.objects,
                    &mut self.shadows.objects,
                    &index,
                )
                .await
            {
                tracing::warn!(namespace = %k.0, secret = %k.1, error = %e, "reconciling the shadow failed; retrying");
            }
            let shadow = self.shadows.objects.get(&(k.0.clone(), shadow_name(&k.1)));
            let e = self
                .publisher
                .publish(k, self.originals.objects.get(k), shadow);
            self.deliver(e);
        }
        if !dirty.is_empty() {
            ready.pass_done(pass.elapsed());
        }
        if first {
            ready.reconciled();
            tracing::info!(
                secrets = self.publisher.published(),
                withdrawn = self.publisher.withdrawn() - withdrawn_before,
                elapsed_ms = opts.started.elapsed().as_millis() as u64,
                "reconciled with the API"
            );
        }
        if (pods_dirty || !dirty.is_empty()) && self.pods.synced {
            let e = self.binder.bind_pods(&self.pods.objects, &self.publisher);
            self.deliver(e);
            // Without a restored state, serving starts with what the API
            // says: secrets published, this node's pods bound.
            if self.agent.is_some() && !ready.is_datapath_ready() && self.barrier().await.is_ok() {
                ready.datapath_ready(opts.started.elapsed());
            }
        }
    }

    /// The state file's mirror, for its closing figures.
    pub(crate) fn mirror(&self) -> Option<&Mirror> {
        self.mirror.as_ref()
    }
}
