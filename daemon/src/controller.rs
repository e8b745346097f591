//! `kloak controller`: the node agent. One per node (a DaemonSet).
//!
//! Three watches feed one loop: labeled Secrets, shadow Secrets, and the
//! annotated pods on this node. Every change marks what it touches dirty;
//! the loop then (1) brings each dirty Secret's shadow in line (`shadow`),
//! (2) sends the data path the secrets that changed, and (3) re-binds each
//! pod's containers to exactly the secrets it references. A full pass runs
//! every `--resync` seconds as a safety net, not as the mechanism.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret as KubeSecret};
use kloak_bpf::{Backend, Config, Probes};
use kloak_webhook::mutate::{SHADOW_SUFFIX, shadow_name};
use kloak_webhook::{LABEL_ENABLED, LABEL_MANAGED};
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use nix::sys::eventfd::{EfdFlags, EventFd};
use zeroize::Zeroizing;

use crate::admin::Health;
use crate::agent::{Agent, Command, SecretTable, Workload};
use crate::certs::{self, CertOpts};
use crate::containers::{self, ContainerId, Layout};
use crate::mirror::{Mirror, Op as MirrorOp};
use crate::policy;
use crate::run::Mode;
use crate::secrets::{Secret, SecretValue};
use crate::{doctor, guardian, pods, shadow};
use kloak_storage::{SecretRecord, TrackedRecord};

#[derive(clap::Args, Clone)]
pub struct ControllerOpts {
    /// This node; only its pods are attached.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Namespace of the webhook's certificate Secret.
    #[arg(long, env = "KLOAK_NAMESPACE", default_value = "kloak-system")]
    pub namespace: String,
    /// Secret holding the webhook's serving certificate.
    #[arg(long, default_value = "kloak-webhook-tls")]
    pub webhook_secret: String,
    /// MutatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, default_value = "kloak")]
    pub webhook_config: String,
    /// Service in front of the webhook pods (its DNS names go in the certificate).
    #[arg(long, default_value = "kloak-webhook")]
    pub webhook_service: String,
    /// Extra DNS name or IP for the webhook certificate (repeatable).
    #[arg(long = "webhook-san")]
    pub webhook_sans: Vec<String>,
    /// Lifetime of a webhook certificate; renewed with a third left.
    #[arg(long, default_value_t = 365 * 24 * 3600)]
    pub cert_validity_secs: u64,
    /// Do not manage the webhook certificate (another component does).
    #[arg(long)]
    pub no_webhook_cert: bool,
    /// Run the data path (BPF). Off: shadows and certificates only.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub datapath: bool,
    /// Rewrite backend; per-pod bindings need the pause backend.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Size of the tls_events ring buffer in bytes (a power of two).
    #[arg(long, default_value_t = kloak_bpf::DEFAULT_RING_BYTES)]
    pub ring_bytes: u32,
    /// After a stop, poll for the next event this long before sleeping. 0 = off.
    #[arg(long, default_value_t = 200)]
    pub busy_poll_us: u64,
    /// Secrets the kernel map holds at most.
    #[arg(long, default_value_t = 4096)]
    pub max_secrets: u32,
    /// A resolver whose answers verify destinations (repeatable). Default:
    /// the nameservers in /etc/resolv.conf.
    #[arg(long = "trusted-dns", value_name = "IP")]
    pub trusted_dns: Vec<std::net::IpAddr>,
    /// Addresses the DNS cache remembers before evicting the oldest.
    #[arg(long, default_value_t = 1024)]
    pub dns_cache_entries: usize,
    /// Full reconcile interval, in seconds (watch events do the real work).
    #[arg(long, default_value_t = 5)]
    pub resync_secs: u64,
    /// The state file a restarted agent reloads its maps from (keep it on
    /// tmpfs: a reboot restarts every pod anyway).
    #[arg(long, env = "KLOAK_STATE", default_value = "/run/kloak/state.redb")]
    pub state: PathBuf,
    /// 32-byte key (raw or hex, mode 0600) sealing secret values in the
    /// state file. Default: `state.key` next to the state file, made on
    /// first start.
    #[arg(long, env = "KLOAK_STATE_KEY_FILE")]
    pub state_key_file: Option<PathBuf>,
    /// Keep no state file: a restart starts empty and waits for the API.
    #[arg(long)]
    pub no_state: bool,
    /// Audit events (one span each) waiting for export at most; beyond,
    /// events are dropped and counted, never waited for.
    #[arg(long, default_value_t = 8192)]
    pub audit_queue: usize,
    /// Admin port: /healthz, /readyz (JSON details), /metrics. Plain HTTP,
    /// apart from the webhook's TLS port.
    #[arg(long, env = "KLOAK_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: std::net::SocketAddr,
    /// Where the host's /sys/fs/cgroup is mounted, when not there.
    #[arg(long, env = "KLOAK_HOST_CGROUP")]
    pub host_cgroup: Option<PathBuf>,
}

type Key = (String, String);

/// How the controller reaches the agent thread: commands, and a wake-up.
type AgentLink = (mpsc::Sender<Command>, Arc<EventFd>);

fn key_of(meta: &kube::api::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A watch as a map, rebuilt on every (re)list.
struct WatchMap<K> {
    objects: BTreeMap<Key, K>,
    relist: Option<BTreeMap<Key, K>>,
    synced: bool,
}

impl<K: kube::Resource + Clone> WatchMap<K> {
    fn new() -> Self {
        WatchMap {
            objects: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }

    /// Applies one event; returns the keys it touched (all of them on a relist).
    fn apply(&mut self, ev: watcher::Event<K>) -> Vec<Key> {
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
struct Published {
    placeholder: String,
    value: Zeroizing<Vec<u8>>,
    rules: crate::rules::Rules,
}

struct State {
    client: Client,
    originals: WatchMap<KubeSecret>,
    shadows: WatchMap<KubeSecret>,
    pods: WatchMap<Pod>,
    /// Stable small ids per (namespace, secret, key), as kernel events carry.
    ids: HashMap<(String, String, String), u32>,
    next_id: u32,
    published: HashMap<u32, Published>,
    /// Published ids per original Secret.
    by_secret: HashMap<Key, BTreeSet<u32>>,
    /// What each tracked cgroup may receive, as last sent.
    tracked: HashMap<u64, (Key, HashSet<u32>)>,
    /// Container → cgroup (path, id, tracked by pid), once found.
    cgroups: HashMap<ContainerId, (PathBuf, u64, bool)>,
    layout: Layout,
    agent: Option<AgentLink>,
    /// The reason each Secret was last refused, so it is logged once.
    refused: HashMap<Key, String>,
    mirror: Option<Mirror>,
    /// The source has been listed once since start: what the state file
    /// restored is now checked against it.
    reconciled: bool,
    /// Secret keys taken out of the data path since start.
    withdrawn: u64,
}

pub async fn run(
    opts: ControllerOpts,
    log: Option<kloak_observability::LogHandle>,
    otel: Option<kloak_observability::OtelSettings>,
) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let started = std::time::Instant::now();
    // Start-up order: the state file, continue what a dead agent left
    // stopped, load the maps, attach, serve; reconcile with the API after.
    let health = Health::new(
        opts.datapath,
        (opts.datapath && !opts.no_state).then(|| opts.state.display().to_string()),
    );
    // One span per substitution event, when OTLP export is configured.
    let audit = match otel {
        Some(s) => {
            let endpoint = s.endpoint.clone();
            let a = kloak_observability::Audit::start(s, opts.audit_queue)
                .context("starting the span exporter")?;
            tracing::info!(endpoint = %endpoint, queue = opts.audit_queue, "exporting a span per substitution over OTLP");
            health.follow_audit(a.stats.clone());
            Some(a)
        }
        None => None,
    };
    crate::admin::serve(opts.admin_listen, health.clone(), log)
        .await
        .with_context(|| format!("binding the admin port {}", opts.admin_listen))?;
    let restored = if opts.datapath && !opts.no_state {
        match open_state(&opts) {
            Ok(r) => Some(r),
            // Two agents on one node would both stop and patch: refuse.
            Err(e) if is_locked(&e) => return Err(e),
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(error = %reason, "the state file cannot be used; serving from memory (a restart will rebuild from the API)");
                health.state_in_memory(reason);
                None
            }
        }
    } else {
        None
    };
    // The previous agent's guardian could continue a process this agent
    // has just stopped: it goes first (after that agent's exit is complete).
    if opts.datapath {
        guardian::retire_predecessors(&guardian_owner(&opts));
    }
    if let Some(r) = &restored {
        for t in &r.tracked {
            if let Ok(cg) = crate::cgroup::Cgroup::open(&t.cgroup) {
                let n = guardian::sweep(&cg);
                if n > 0 {
                    tracing::warn!(cgroup = %t.cgroup.display(), continued = n, "continued processes the previous agent left stopped");
                }
            }
        }
    }
    let mirror = restored.as_ref().map(|r| r.mirror.clone());
    let (agent, agent_thread) = if opts.datapath {
        let (tx, handle) = start_datapath(
            &opts,
            shutdown.clone(),
            mirror.clone(),
            audit.clone(),
            health.clone(),
        )?;
        (Some(tx), Some(handle))
    } else {
        (None, None)
    };
    if !opts.no_webhook_cert {
        let mut sans = vec![
            format!("{}.{}.svc", opts.webhook_service, opts.namespace),
            format!(
                "{}.{}.svc.cluster.local",
                opts.webhook_service, opts.namespace
            ),
        ];
        sans.extend(opts.webhook_sans.iter().cloned());
        let cert = CertOpts {
            namespace: opts.namespace.clone(),
            secret: opts.webhook_secret.clone(),
            webhook_config: opts.webhook_config.clone(),
            sans,
            validity: Duration::from_secs(opts.cert_validity_secs),
        };
        let (tx, _rx) = tokio::sync::watch::channel(false);
        tokio::spawn(certs::run(client.clone(), cert, tx));
    }
    let mut layout = Layout::detect().context("reading /proc/self/mountinfo")?;
    if let Some(host) = &opts.host_cgroup {
        layout = layout.rooted(std::path::Path::new("/sys/fs/cgroup"), host);
    }
    tracing::info!(node = %opts.node, datapath = opts.datapath, cgroup_layout = ?layout, "kloak controller starting");
    let mut st = State::new(client.clone(), layout, agent);
    st.mirror = mirror;
    if let Some(r) = restored {
        st.restore(&r.secrets, &r.tracked);
        for rec in &r.secrets {
            if let Ok(rules) = crate::rules::Rules::parse(&rec.hosts, &rec.ports) {
                let hpack_safe = crate::hpack::huffman_bits(rec.placeholder.as_bytes())
                    == crate::hpack::huffman_bits(&rec.value);
                st.send(Command::PutSecret(Secret {
                    id: rec.id,
                    name: rec.name.clone(),
                    env: String::new(),
                    value: SecretValue::new(rec.value.clone()),
                    placeholder: rec.placeholder.clone(),
                    rules,
                    hpack_safe,
                }));
            }
        }
        // The maps first, then the probes: a write that meets the probe
        // finds its connection already known.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        st.send(Command::Restore {
            dns: r.dns,
            conns: r.conns,
            ssl: r.ssl,
            done: Some(done_tx),
        });
        for t in &r.tracked {
            let (namespace, pod) = t.pod.split_once('/').unwrap_or(("", &t.pod));
            st.send(Command::Track {
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
        let (barrier_tx, barrier_rx) = tokio::sync::oneshot::channel();
        st.send(Command::Barrier(barrier_tx));
        let loaded = done_rx.await.unwrap_or_default();
        if barrier_rx.await.is_ok() {
            health.follow_mirror(
                r.mirror.stats.clone(),
                crate::admin::RestoredCounts {
                    secrets: r.secrets.len() as u64,
                    containers: r.tracked.len() as u64,
                    dns_answers: loaded.dns_answers,
                    connections: loaded.connections,
                    tls_objects: loaded.tls_objects,
                },
            );
            health.datapath_ready(started.elapsed());
        }
        tracing::info!(
            secrets = r.secrets.len(),
            containers = r.tracked.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "serving from the state file; reconciling with the API next"
        );
    }
    let secrets: Api<KubeSecret> = Api::all(client.clone());
    let pods_api: Api<Pod> = Api::all(client.clone());
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
    let mut tick = tokio::time::interval(Duration::from_secs(opts.resync_secs.max(1)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    loop {
        let mut dirty: BTreeSet<Key> = BTreeSet::new();
        let mut pods_dirty = false;
        tokio::select! {
            Some(ev) = originals.next() => match ev {
                Ok(ev) => dirty.extend(st.originals.apply(ev)),
                Err(e) => tracing::warn!(error = %e, "watching labeled Secrets"),
            },
            Some(ev) = shadows.next() => match ev {
                Ok(ev) => dirty.extend(st.shadows.apply(ev).into_iter().filter_map(|(ns, n)| {
                    n.strip_suffix(SHADOW_SUFFIX).map(|o| (ns, o.to_string()))
                })),
                Err(e) => tracing::warn!(error = %e, "watching shadow Secrets"),
            },
            Some(ev) = pod_events.next() => match ev {
                Ok(ev) => { st.pods.apply(ev); pods_dirty = true; }
                Err(e) => tracing::warn!(error = %e, "watching this node's pods"),
            },
            _ = tick.tick() => {
                dirty.extend(st.originals.objects.keys().cloned());
                dirty.extend(st.shadows.objects.keys().filter_map(|(ns, n)| {
                    n.strip_suffix(SHADOW_SUFFIX).map(|o| (ns.clone(), o.to_string()))
                }));
                pods_dirty = true;
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        if !st.originals.synced || !st.shadows.synced {
            continue;
        }
        let first = !st.reconciled;
        if first {
            // The source is the truth: what the state file restored for
            // Secrets deleted while the agent was down goes now.
            st.reconciled = true;
            dirty.extend(st.by_secret.keys().cloned());
            pods_dirty = true;
        }
        let pass = std::time::Instant::now();
        let index = shadow::Index::build(st.shadows.objects.values());
        let withdrawn_before = st.withdrawn;
        for k in &dirty {
            if let Err(e) = st.reconcile_shadow(k, &index).await {
                tracing::warn!(namespace = %k.0, secret = %k.1, error = %e, "reconciling the shadow failed; retrying");
            }
            st.publish(k);
        }
        if !dirty.is_empty() {
            health.metrics.sync.observe(pass.elapsed().as_secs_f64());
        }
        if first {
            health.reconciled();
            tracing::info!(
                secrets = st.published.len(),
                withdrawn = st.withdrawn - withdrawn_before,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "reconciled with the API"
            );
        }
        if (pods_dirty || !dirty.is_empty()) && st.pods.synced {
            st.bind_pods();
            if opts.datapath && !health.is_datapath_ready() {
                // Without a restored state, serving starts with what the
                // API says: secrets published, this node's pods bound.
                let (tx, rx) = tokio::sync::oneshot::channel();
                st.send(Command::Barrier(tx));
                if rx.await.is_ok() {
                    health.datapath_ready(started.elapsed());
                }
            }
        }
    }
    if let Some(m) = &st.mirror {
        let s = &m.stats;
        tracing::info!(
            batches = s.batches.load(Ordering::Relaxed),
            records = s.records.load(Ordering::Relaxed),
            failures = s.failures.load(Ordering::Relaxed),
            degraded = s.degraded.load(Ordering::Relaxed),
            "state file"
        );
    }
    tracing::info!("kloak controller stopping");
    shutdown.store(true, Ordering::Release);
    drop(st);
    if let Some(h) = agent_thread {
        let _ = h.join();
    }
    // The agent's handle is gone with its thread: what is queued goes out.
    if let Some(a) = audit {
        a.finish(Duration::from_secs(5));
    }
    Ok(())
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl State {
    fn new(client: Client, layout: Layout, agent: Option<AgentLink>) -> State {
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
    fn restore(&mut self, secrets: &[SecretRecord], tracked: &[TrackedRecord]) {
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
            if let Ok(rules) = crate::rules::Rules::parse(&r.hosts, &r.ports) {
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
    async fn reconcile_shadow(
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
    async fn remove_orphan(
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

    /// Sends the data path what changed for Secret `k`.
    fn publish(&mut self, k: &Key) {
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
                let hpack_safe = crate::hpack::huffman_bits(placeholder.as_bytes())
                    == crate::hpack::huffman_bits(value.expose());
                want.insert(
                    id,
                    Secret {
                        id,
                        name: format!("{ns}/{name}/{key}"),
                        env: String::new(),
                        value: SecretValue::new(value.expose().to_vec()),
                        placeholder,
                        rules: checked.rules.clone(),
                        hpack_safe,
                    },
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

    fn send(&self, c: Command) {
        if let Some((tx, wake)) = &self.agent {
            if tx.send(c).is_err() {
                tracing::error!("the data path is gone");
            }
            let _ = wake.write(1);
        }
    }

    /// Tracks every container of every annotated pod on this node, bound to
    /// the secrets that pod references; untracks the rest.
    fn bind_pods(&mut self) {
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
                let id = crate::cgroup::Cgroup::open(&path).ok()?.id;
                self.cgroups.insert(c.clone(), (path.clone(), id, false));
                Some((path, id, false))
            }
            Some(containers::Found { v1: Some(path), .. }) => {
                // No v2 id for the kernel to match: its processes are
                // tracked by pid, under an id of ours that no cgroup v2
                // inode can take (the top bit).
                let id = crate::cgroup::Cgroup::open(&path).ok()?.id | 1 << 63;
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

/// Loads the BPF programs and runs the agent on its own thread; the
/// returned sender feeds it secrets and containers.
fn is_locked(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<kloak_storage::Error>(),
        Some(kloak_storage::Error::Locked { .. })
    )
}

/// Names this node agent to its successor: the state file is what one
/// agent at a time owns (also when it is not kept).
fn guardian_owner(opts: &ControllerOpts) -> String {
    opts.state.display().to_string()
}

/// What the state file held at start, and the mirror that now follows it.
struct Restored {
    mirror: Mirror,
    secrets: Vec<SecretRecord>,
    tracked: Vec<TrackedRecord>,
    dns: Vec<kloak_storage::DnsRecord>,
    conns: Vec<(kloak_storage::ConnKey, kloak_storage::ConnRecord)>,
    ssl: Vec<kloak_storage::SslRecord>,
}

fn open_state(opts: &ControllerOpts) -> anyhow::Result<Restored> {
    let dir = opts
        .state
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    let key = match &opts.state_key_file {
        Some(p) => kloak_storage::Key::from_file(p)?,
        None => kloak_storage::Key::load_or_create(&dir.join("state.key"))?,
    };
    let (store, report, snap) = kloak_storage::Store::open_loaded(&opts.state, key)?;
    if let Some((aside, reason)) = &report.moved_aside {
        tracing::warn!(state = %opts.state.display(), moved_to = %aside.display(), reason = %reason, "the state file was unusable; rebuilding from the API");
    }
    if report.rebooted {
        tracing::info!(
            "the node rebooted since the state file was written: connections and DNS answers dropped"
        );
    }
    Ok(Restored {
        mirror: Mirror::spawn(store),
        secrets: snap.secrets,
        tracked: snap.tracked,
        dns: snap.dns,
        conns: snap.conns,
        ssl: snap.ssl,
    })
}

fn start_datapath(
    opts: &ControllerOpts,
    shutdown: Arc<AtomicBool>,
    mirror: Option<Mirror>,
    audit: Option<kloak_observability::Audit>,
    health: Arc<Health>,
) -> anyhow::Result<(AgentLink, std::thread::JoinHandle<()>)> {
    let report = doctor::run_checks();
    if let Some(msg) = doctor::refusal(&report) {
        bail!(msg);
    }
    let backend = match opts.mode {
        Mode::Auto | Mode::Pause => Backend::Pause,
        Mode::Inplace => bail!(
            "--mode inplace: the in-place backend rewrites in the kernel without asking the agent, so it cannot enforce per-pod bindings or destination rules; the controller uses --mode pause"
        ),
    };
    let trusted = if opts.trusted_dns.is_empty() {
        crate::dns::resolv_conf_nameservers(std::path::Path::new("/etc/resolv.conf"))
    } else {
        opts.trusted_dns.clone()
    };
    let guardian = guardian::spawn(None, Some(&guardian_owner(opts)))
        .context("starting the guardian process")?;
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .context("creating the data path's wake-up eventfd")?,
    );
    let agent_wake = wake.clone();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let cfg = Config {
        backend,
        ring_bytes: opts.ring_bytes,
        scrub: true,
        agent_tgid: std::process::id(),
        max_secrets: opts.max_secrets,
        huffman_signatures: crate::hpack::prefix_signatures(),
    };
    let busy = Duration::from_micros(opts.busy_poll_us);
    let dns_entries = opts.dns_cache_entries;
    let handle = std::thread::Builder::new()
        .name("kloak-datapath".into())
        .spawn(move || {
            let probes = match Probes::load(&cfg) {
                Ok(p) => p,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut agent = Agent::new(&probes, SecretTable::default(), true)
                .with_busy_poll(busy)
                .with_dns(crate::dns::DnsCache::new(trusted, dns_entries))
                .with_commands(rx, agent_wake, guardian);
            if let Some(m) = mirror {
                agent = agent.with_mirror(m);
            }
            if let Some(a) = audit {
                agent = agent.with_audit(a);
            }
            agent = agent.with_metrics(health.metrics.clone());
            health.follow_datapath(probes.maps(), agent.counters.clone());
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| agent.run(&shutdown)));
            let msg = match r {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the agent thread panicked".into(),
            };
            // Without its agent no tracked process may meet another stop:
            // exit, the kernel detaches every probe, the guardian continues
            // whatever was stopped, and the DaemonSet restarts us.
            eprintln!("kloak: data path failed: {msg}");
            std::process::exit(70);
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("loading the BPF programs: {e}"),
        Err(_) => bail!("the data path thread died while starting"),
    }
    tracing::info!(backend = backend.as_str(), "data path ready");
    Ok(((tx, wake), handle))
}

#[cfg(test)]
mod tests {
    //! The reconciler's API traffic against kube's mock service: what it
    //! sends, with which preconditions, and how it takes conflicts.

    use super::*;
    use http::{Method, Request, Response};
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
            Some((tx, wake)),
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
