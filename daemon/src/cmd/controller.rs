//! `kloak controller`: the node agent, one per node (a DaemonSet).
//!
//! Start-up order: admin port, the state file, continue what a dead agent
//! left stopped, load the maps, attach, serve; reconcile with the API after.
//! The watches and the reconcile loop live in `k8s::controller`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret as KubeSecret};
use kloak_storage::{SecretRecord, TrackedRecord};
use kloak_webhook::mutate::SHADOW_SUFFIX;
use kloak_webhook::{LABEL_ENABLED, LABEL_MANAGED};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::cmd::datapath::{self, Datapath, DatapathOpts, Decides, Spec};
use crate::datapath::agent::{Command, Workload};
use crate::datapath::guardian;
use crate::datapath::secrets::{Secret, SecretValue};
use crate::k8s::certs::{self, CertOpts};
use crate::k8s::containers::Layout;
use crate::k8s::controller::{Key, State};
use crate::k8s::shadow;
use crate::node::admin::Health;
use crate::node::tasks::Tasks;
use crate::state::mirror::Mirror;

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
    #[command(flatten)]
    pub datapath_opts: DatapathOpts,
    /// Secrets the kernel map holds at most.
    #[arg(long, default_value_t = 4096)]
    pub max_secrets: u32,
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

pub async fn run(
    opts: ControllerOpts,
    log: Option<kloak_observability::LogHandle>,
    otel: Option<kloak_observability::OtelSettings>,
) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let started = std::time::Instant::now();
    // Start-up order: the state file, continue what a dead agent left
    // stopped, load the maps, attach, serve; reconcile with the API after.
    let health = Health::new(
        opts.datapath,
        (opts.datapath && !opts.no_state).then(|| opts.state.display().to_string()),
    );
    let tasks = Tasks::with_metrics(health.tasks.clone());
    // One span per substitution event, when OTLP export is configured.
    let audit = match otel {
        Some(s) => {
            let endpoint = s.endpoint.clone();
            let a = kloak_observability::Audit::start(s, opts.audit_queue)
                .context("starting the span exporter")?;
            tracing::info!(endpoint = %endpoint, queue = opts.audit_queue, "exporting a span per substitution over OTLP");
            health.follow_audit(a.stats.clone());
            tasks.watch("audit-export", a.liveness());
            Some(a)
        }
        None => None,
    };
    crate::node::admin::serve(opts.admin_listen, health.clone(), log, &tasks)
        .await
        .with_context(|| format!("binding the admin port {}", opts.admin_listen))?;
    let restored = if opts.datapath && !opts.no_state {
        match open_state(&opts, &tasks) {
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
            if let Ok(cg) = crate::datapath::cgroup::Cgroup::open(&t.cgroup) {
                let n = guardian::sweep(&cg);
                if n > 0 {
                    tracing::warn!(cgroup = %t.cgroup.display(), continued = n, "continued processes the previous agent left stopped");
                }
            }
        }
    }
    let mirror = restored.as_ref().map(|r| r.mirror.clone());
    let dp = if opts.datapath {
        Some(start_datapath(
            &opts,
            mirror.clone(),
            audit.clone(),
            &health,
        )?)
    } else {
        None
    };
    let agent = dp.as_ref().map(Datapath::link);
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
        let client = client.clone();
        tasks.spawn("webhook-cert", move |_| async move {
            certs::run(client, cert, tx).await;
            Ok::<(), String>(())
        });
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
            if let Ok(rules) = crate::datapath::rules::Rules::parse(&rec.hosts, &rec.ports) {
                st.send(Command::PutSecret(Secret::new(
                    rec.id,
                    rec.name.clone(),
                    SecretValue::new(rec.value.clone()),
                    rec.placeholder.clone(),
                    rules,
                )));
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
                crate::node::admin::RestoredCounts {
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
    tasks.begin_shutdown();
    drop(st);
    if let Some(dp) = dp {
        dp.stop();
    }
    // The agent's handle is gone with its thread: what is queued goes out.
    if let Some(a) = audit {
        a.finish(Duration::from_secs(5));
    }
    // Every mirror handle is gone too: its thread commits the last batch
    // and ends; the admin server and the certificate upkeep stop.
    tokio::task::spawn_blocking(move || tasks.drain(Duration::from_secs(10))).await?;
    Ok(())
}

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

fn open_state(opts: &ControllerOpts, tasks: &Tasks) -> anyhow::Result<Restored> {
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
    let (mirror, commit) = Mirror::new(store);
    tasks
        .spawn_thread("state-mirror", move |_| {
            commit();
            Ok::<(), String>(())
        })
        .context("starting the state file's mirror thread")?;
    Ok(Restored {
        mirror,
        secrets: snap.secrets,
        tracked: snap.tracked,
        dns: snap.dns,
        conns: snap.conns,
        ssl: snap.ssl,
    })
}

/// The data path of the node agent: per-pod bindings, the pause backend,
/// a guardian that a successor agent can retire.
fn start_datapath(
    opts: &ControllerOpts,
    mirror: Option<Mirror>,
    audit: Option<kloak_observability::Audit>,
    health: &Health,
) -> anyhow::Result<Datapath> {
    datapath::check_node()?;
    let backend = datapath::choose_backend(opts.datapath_opts.mode, Decides::Bindings)?;
    let guardian = guardian::spawn(None, Some(&guardian_owner(opts)))
        .context("starting the guardian process")?;
    let dp = datapath::start(
        &opts.datapath_opts,
        Spec {
            backend,
            scrub: true,
            max_secrets: opts.max_secrets,
            secrets: Vec::new(),
            track: None,
            per_pod: true,
            guardian,
            mirror,
            audit,
            metrics: health.metrics.clone(),
        },
    )?;
    health.follow_datapath(dp.maps.clone(), dp.counters.clone());
    tracing::info!(backend = backend.as_str(), "data path ready");
    Ok(dp)
}
