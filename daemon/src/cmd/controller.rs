//! `kloak controller`: the node agent, one per node (a DaemonSet).
//!
//! Start-up order: admin port, the state file, continue what a dead agent
//! left stopped, load the maps, attach, serve; reconcile with the API after.
//! The watches and the reconcile loop live in `k8s::controller`; this
//! file is the order things start and stop in.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use kube::Client;

use crate::cmd::datapath::{self, Datapath, DatapathOpts, Decides, Spec, WireHooks};
use crate::datapath::guardian;
use crate::k8s::certs::{self, CertOpts};
use crate::k8s::containers::Layout;
use crate::k8s::controller::{Controller, LoopOpts, Readiness};
use crate::node::admin::{Health, RestoredCounts};
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
    let started = Instant::now();
    // Start-up order: the state file, continue what a dead agent left
    // stopped, load the maps, attach, serve; reconcile with the API after.
    let health = Health::new(
        opts.datapath,
        (opts.datapath && !opts.no_state).then(|| opts.state.display().to_string()),
    );
    let tasks = Tasks::with_metrics(health.tasks.clone());
    let audit = start_audit(otel, opts.audit_queue, &health, &tasks)?;
    crate::node::admin::serve(opts.admin_listen, health.clone(), log, &tasks)
        .await
        .with_context(|| format!("binding the admin port {}", opts.admin_listen))?;
    let restored = if opts.datapath && !opts.no_state {
        load_state(&opts, &health, &tasks)?
    } else {
        None
    };
    // The previous agent's guardian could continue a process this agent
    // has just stopped: it goes first (after that agent's exit is complete).
    if opts.datapath {
        guardian::retire_predecessors(&guardian_owner(&opts));
    }
    if let Some(r) = &restored {
        continue_stopped(&r.snap.tracked);
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
    if !opts.no_webhook_cert {
        let (tx, _rx) = tokio::sync::watch::channel(false);
        let (client, cert) = (client.clone(), cert_opts(&opts));
        tasks.spawn("webhook-cert", move |_| async move {
            certs::run(client, cert, tx).await;
            Ok::<(), String>(())
        });
    }
    let layout = host_layout(&opts).context("reading /proc/self/mountinfo")?;
    tracing::info!(node = %opts.node, datapath = opts.datapath, cgroup_layout = ?layout, "kloak controller starting");
    let mut ctl = Controller::new(client, layout, dp.as_ref().map(Datapath::link), mirror);
    if let Some(r) = restored {
        restore(&mut ctl, r, &health, started).await;
    }
    let loop_opts = LoopOpts {
        node: opts.node.clone(),
        resync: Duration::from_secs(opts.resync_secs.max(1)),
        started,
    };
    ctl.run(&loop_opts, &*health).await?;
    if let Some(m) = ctl.mirror() {
        log_mirror(m);
    }
    tracing::info!("kloak controller stopping");
    drop(ctl);
    if let Some(dp) = dp {
        dp.stop();
    }
    // The agent's handle is gone with its thread: what is queued goes out.
    if let Some(a) = audit {
        a.finish(Duration::from_secs(5));
    }
    // Every mirror handle is gone too: its thread commits the last batch
    // and ends; the admin server (up until now, for the last scrape) and the
    // certificate upkeep stop.
    tokio::task::spawn_blocking(move || tasks.drain(Duration::from_secs(10))).await?;
    Ok(())
}

/// One span per substitution event, when OTLP export is configured.
fn start_audit(
    otel: Option<kloak_observability::OtelSettings>,
    queue: usize,
    health: &Health,
    tasks: &Tasks,
) -> anyhow::Result<Option<kloak_observability::Audit>> {
    let Some(s) = otel else { return Ok(None) };
    let endpoint = s.endpoint.clone();
    let a = kloak_observability::Audit::start(s, queue).context("starting the span exporter")?;
    tracing::info!(endpoint = %endpoint, queue, "exporting a span per substitution over OTLP");
    health.follow_audit(a.stats.clone());
    tasks.watch("audit-export", a.liveness());
    Ok(Some(a))
}

/// The state file, or None to serve from memory when it cannot be used;
/// an error only when another agent holds it.
fn load_state(
    opts: &ControllerOpts,
    health: &Health,
    tasks: &Tasks,
) -> anyhow::Result<Option<Restored>> {
    match open_state(opts, tasks) {
        Ok(r) => Ok(Some(r)),
        // Two agents on one node would both stop and patch: refuse.
        Err(e) if is_locked(&e) => Err(e),
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::error!(error = %reason, "the state file cannot be used; serving from memory (a restart will rebuild from the API)");
            health.state_in_memory(reason);
            Ok(None)
        }
    }
}

/// A dead agent may have left processes stopped mid-write in the
/// containers it tracked; nobody else would ever continue them.
fn continue_stopped(tracked: &[kloak_storage::TrackedRecord]) {
    for t in tracked {
        if let Ok(cg) = crate::datapath::cgroup::Cgroup::open(&t.cgroup) {
            let n = guardian::sweep(&cg);
            if n > 0 {
                tracing::warn!(cgroup = %t.cgroup.display(), continued = n, "continued processes the previous agent left stopped");
            }
        }
    }
}

fn log_mirror(m: &Mirror) {
    let s = &m.stats;
    tracing::info!(
        batches = s.batches.load(Ordering::Relaxed),
        records = s.records.load(Ordering::Relaxed),
        failures = s.failures.load(Ordering::Relaxed),
        degraded = s.degraded.load(Ordering::Relaxed),
        "state file"
    );
}

/// The loop reports to the admin port.
impl Readiness for Health {
    fn pass_done(&self, took: Duration) {
        self.metrics.sync.observe(took.as_secs_f64());
    }
    fn reconciled(&self) {
        Health::reconciled(self);
    }
    fn is_datapath_ready(&self) -> bool {
        Health::is_datapath_ready(self)
    }
    fn datapath_ready(&self, after: Duration) {
        Health::datapath_ready(self, after);
    }
}

/// Serves what the state file held until the API has been listed; the
/// data path is ready as soon as it has applied it.
async fn restore(ctl: &mut Controller, r: Restored, health: &Health, started: Instant) {
    let (secrets, containers) = (r.snap.secrets.len(), r.snap.tracked.len());
    if let Some(loaded) = ctl.restore(r.snap).await {
        health.follow_mirror(
            r.mirror.stats.clone(),
            RestoredCounts {
                secrets: secrets as u64,
                containers: containers as u64,
                dns_answers: loaded.dns_answers,
                connections: loaded.connections,
                tls_objects: loaded.tls_objects,
            },
        );
        health.datapath_ready(started.elapsed());
    }
    tracing::info!(
        secrets,
        containers,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "serving from the state file; reconciling with the API next"
    );
}

/// The webhook's certificate: the Service's DNS names and any extra ones.
fn cert_opts(opts: &ControllerOpts) -> CertOpts {
    let mut sans = vec![
        format!("{}.{}.svc", opts.webhook_service, opts.namespace),
        format!(
            "{}.{}.svc.cluster.local",
            opts.webhook_service, opts.namespace
        ),
    ];
    sans.extend(opts.webhook_sans.iter().cloned());
    CertOpts {
        namespace: opts.namespace.clone(),
        secret: opts.webhook_secret.clone(),
        webhook_config: opts.webhook_config.clone(),
        sans,
        validity: Duration::from_secs(opts.cert_validity_secs),
    }
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
    snap: kloak_storage::Snapshot,
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
        .spawn_worker("mirror", move |_| {
            commit();
            Ok::<(), String>(())
        })
        .context("starting the state file's mirror thread")?;
    Ok(Restored { mirror, snap })
}

/// The host's cgroup hierarchies, as this process reaches them.
fn host_layout(opts: &ControllerOpts) -> std::io::Result<Layout> {
    let layout = Layout::detect()?;
    Ok(match &opts.host_cgroup {
        Some(host) => layout.rooted(std::path::Path::new("/sys/fs/cgroup"), host),
        None => layout,
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
            wire_hooks: WireHooks::PodVeths,
            // The host's root, not this container's own view: the pods'
            // sockets must be below it.
            dns_cgroup: host_layout(opts).ok().and_then(|l| l.unified),
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
