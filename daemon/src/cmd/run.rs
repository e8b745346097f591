//! `kloak run`: one command, its descendants, and placeholders in its
//! environment, without Kubernetes.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cmd::datapath::{self, DatapathOpts, Decides, Spec, WireHooks};
use crate::datapath::cgroup::Cgroup;
use crate::datapath::guardian;
use crate::datapath::secrets;

/// `kloak run`'s options.
#[derive(clap::Args)]
pub struct RunOpts {
    /// YAML file listing the secrets.
    #[arg(long)]
    pub secrets: PathBuf,
    #[command(flatten)]
    pub datapath: DatapathOpts,
    /// Put placeholders back into the application's buffer after each write.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub scrub: bool,
    /// Write counters (never values) as JSON here when the command exits.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

pub fn run(o: RunOpts) -> anyhow::Result<i32> {
    let secrets = secrets::load(&o.secrets)?;
    datapath::check_node()?;
    let ruled = secrets.iter().any(|s| !s.rules.unrestricted());
    let backend = datapath::choose_backend(
        o.datapath.mode,
        if ruled {
            Decides::Rules
        } else {
            Decides::Nothing
        },
    )?;
    for s in secrets.iter().filter(|s| !s.hpack_safe) {
        tracing::warn!(
            secret = %s.name,
            "no placeholder can match this value's HPACK Huffman length: in HTTP/2 header values it goes out unchanged (HTTP/1.1 and bodies are not affected)"
        );
    }
    if backend != kloak_bpf::Backend::Wire {
        for s in secrets.iter().filter(|s| s.require_wire) {
            tracing::warn!(
                secret = %s.name,
                backend = backend.as_str(),
                "secret has requireWire and this run does not use the wire backend: its placeholder always goes out unchanged"
            );
        }
    }
    for s in secrets.iter().filter(|s| s.rules.unrestricted()) {
        tracing::warn!(secret = %s.name, "secret has no hosts or port: any destination receives it");
    }
    let trusted = o.datapath.trusted_resolvers();
    if trusted.is_empty() && ruled {
        tracing::warn!(
            "no trusted DNS resolver (none in /etc/resolv.conf, no --trusted-dns): only IP and CIDR rules can match"
        );
    }

    // An earlier run whose agent and guardian both died may have left a
    // process stopped: continue it before anything else.
    for stale in crate::datapath::cgroup::stale_runs() {
        let n = guardian::sweep(&stale);
        if n > 0 {
            tracing::warn!(cgroup = %stale.path.display(), continued = n, "continued processes an earlier run left stopped");
        }
        stale.remove_if_empty();
    }
    let cg = Cgroup::create(&format!("run-{}", std::process::id()))?;
    let procs = cg.procs_file()?;
    let guardian = guardian::spawn(Some(&cg), None).context("starting the guardian process")?;
    // One span per substitution event when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let audit = match kloak_observability::OtelSettings::from_env(env!("CARGO_PKG_VERSION"), None) {
        Some(s) => {
            Some(kloak_observability::Audit::start(s, 8192).context("starting the span exporter")?)
        }
        None => None,
    };
    let env: Vec<(String, String)> = secrets
        .iter()
        .map(|s| (s.env.clone(), s.placeholder.clone()))
        .collect();
    let nsecrets = secrets.len();
    let dp = datapath::start(
        &o.datapath,
        Spec {
            backend,
            scrub: o.scrub,
            max_secrets: (nsecrets as u32).max(64),
            secrets,
            track: Some((cg.id, cg.path.clone())),
            per_pod: false,
            wire_hooks: WireHooks::HostDevices,
            dns_cgroup: crate::datapath::cgroup::cgroup2_root().ok(),
            guardian,
            mirror: None,
            audit: audit.clone(),
            metrics: Default::default(),
        },
    )?;
    tracing::info!(backend = backend.as_str(), secrets = nsecrets, cgroup = %cg.path.display(), trusted_dns = ?trusted, dns = %dp.dns_hook.describe(), "kloak run ready");
    let counters = dp.counters.clone();

    let status = std::thread::scope(|sc| -> anyhow::Result<std::process::ExitStatus> {
        let mut cmd = Command::new(&o.command[0]);
        cmd.args(&o.command[1..]).envs(env);
        kloak_bpf::sys::spawn_into_cgroup(&mut cmd, &procs);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", o.command[0]))?;
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])
            .context("installing signal handlers")?;
        let handle = signals.handle();
        let child_pid = Pid::from_raw(child.id() as i32);
        sc.spawn(move || {
            for sig in signals.forever() {
                if let Ok(s) = Signal::try_from(sig) {
                    let _ = kill(child_pid, s);
                }
            }
        });
        let status = child.wait();
        handle.close();
        Ok(status?)
    });
    // Handles what is queued, then detaches every probe: descendants the
    // command left behind keep running untracked.
    let fin = dp.stop();
    guardian::sweep(&cg);
    let status = status?;
    let Some(fin) = fin else {
        cg.remove_if_empty();
        anyhow::bail!(
            "the data path thread did not finish cleanly; its counters are lost (the command exited with {status})"
        );
    };
    let stats = fin.stats;
    if stats.lost_events > 0 {
        let lost = stats.lost_events;
        tracing::warn!(
            lost,
            "the tls_events ring buffer was full {lost} time(s); those placeholders went out unchanged (raise --ring-bytes)"
        );
    }
    // What is queued goes out before the counts are written.
    let audit_stats = audit.as_ref().map(|a| a.stats.clone());
    if let Some(a) = audit {
        a.finish(std::time::Duration::from_secs(5));
    }
    if let Some(path) = &o.stats_json {
        let s = stats;
        let j = serde_json::json!({
            "backend": backend.as_str(),
            "bpf": {
                "writes": s.writes, "bytes": s.bytes, "hits": s.hits, "unknown": s.unknown,
                "lost_events": s.lost_events, "unreadable": s.unreadable, "overflow": s.overflow,
                "tailcall_failures": s.tailcall_failures, "stops": s.stops, "write_failures": s.write_failures,
                "huffman_candidates": s.huffman_candidates, "splits": s.splits,
                "wire_armed": s.wire_armed, "wire_packets": s.wire_packets,
                "wire_misses": s.wire_misses, "wire_full": s.wire_full,
                "wire_drops": s.wire_drops, "wire_fallbacks": s.wire_fallbacks,
                "wire_unproven": s.wire_unproven,
                "require_wire": s.require_wire,
                "dns_queries": s.dns_queries, "dns_answers": s.dns_answers,
                "dns_mismatched": s.dns_mismatched, "dns_foreign": s.dns_foreign,
            },
            "agent": &*counters,
            "audit": audit_stats.map(|a| serde_json::json!({
                "queued": a.queued.load(Ordering::Relaxed),
                "dropped_queue_full": a.dropped_queue_full.load(Ordering::Relaxed),
                "dropped_export_failed": a.dropped_export_failed.load(Ordering::Relaxed),
                "exported": a.exported.load(Ordering::Relaxed),
            })),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&j)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    cg.remove_if_empty();

    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
