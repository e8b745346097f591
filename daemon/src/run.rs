//! `kloak run`: one command, its descendants, and placeholders in its
//! environment, without Kubernetes.

use std::ffi::OsString;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use kloak_bpf::{Backend, Config, Probes, SecretEntry, features};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::agent::{Agent, SecretTable};
use crate::cgroup::Cgroup;
use crate::{doctor, guardian, secrets};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Auto,
    Inplace,
    Pause,
}

/// `kloak run`'s options.
#[derive(clap::Args)]
pub struct RunOpts {
    /// YAML file listing the secrets.
    #[arg(long)]
    pub secrets: PathBuf,
    /// Rewrite backend: in-place needs bpf_probe_write_user, pause works under kernel lockdown.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Put placeholders back into the application's buffer after each write.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub scrub: bool,
    /// Size of the tls_events ring buffer in bytes (a power of two).
    #[arg(long, default_value_t = kloak_bpf::DEFAULT_RING_BYTES)]
    pub ring_bytes: u32,
    /// After a stop, poll for the next event this many microseconds
    /// before sleeping: lower latency per placeholder, some CPU. 0 = off.
    #[arg(long, default_value_t = 200)]
    pub busy_poll_us: u64,
    /// A resolver whose answers verify destinations (repeatable). Default:
    /// the nameservers in /etc/resolv.conf. Answers from anywhere else
    /// authorise nothing.
    #[arg(long = "trusted-dns", value_name = "IP")]
    pub trusted_dns: Vec<std::net::IpAddr>,
    /// Addresses the DNS cache remembers before evicting the oldest.
    #[arg(long, default_value_t = 1024)]
    pub dns_cache_entries: usize,
    /// Write counters (never values) as JSON here when the command exits.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

/// Exit code for a failure of Kloak itself, as opposed to the command's.
const EXIT_INTERNAL: i32 = 70;

pub fn choose_backend(mode: Mode) -> anyhow::Result<Backend> {
    Ok(match mode {
        Mode::Auto => doctor::auto_backend(),
        Mode::Pause => Backend::Pause,
        Mode::Inplace => {
            if !features::probe_write_user().unwrap_or(false) {
                bail!(
                    "--mode inplace: this kernel refuses bpf_probe_write_user to uprobe programs (lockdown: {}); use --mode pause or --mode auto",
                    doctor::lockdown().unwrap_or_else(|| "unknown".into())
                );
            }
            Backend::InPlace
        }
    })
}

pub fn run(o: RunOpts) -> anyhow::Result<i32> {
    let secrets = secrets::load(&o.secrets)?;
    let report = doctor::run_checks();
    if let Some(msg) = doctor::refusal(&report) {
        bail!(msg);
    }
    let ruled = secrets.iter().any(|s| !s.rules.unrestricted());
    // Only the pause backend enforces destination rules in this version, so
    // `auto` takes it whenever a secret has them.
    let backend = if ruled && o.mode == Mode::Auto {
        Backend::Pause
    } else {
        choose_backend(o.mode)?
    };
    for s in secrets.iter().filter(|s| !s.hpack_safe) {
        tracing::warn!(
            secret = %s.name,
            "no placeholder can match this value's HPACK Huffman length: in HTTP/2 header values it goes out unchanged (HTTP/1.1 and bodies are not affected)"
        );
    }
    for s in secrets.iter().filter(|s| s.rules.unrestricted()) {
        tracing::warn!(secret = %s.name, "secret has no hosts or port: any destination receives it");
    }
    if backend == Backend::InPlace && ruled {
        bail!(
            "destination rules (hosts, port) are enforced by the pause backend only in this version; use --mode pause, or drop the rules"
        );
    }
    let trusted = if o.trusted_dns.is_empty() {
        crate::dns::resolv_conf_nameservers(std::path::Path::new("/etc/resolv.conf"))
    } else {
        o.trusted_dns.clone()
    };
    if trusted.is_empty() && secrets.iter().any(|s| !s.rules.unrestricted()) {
        tracing::warn!(
            "no trusted DNS resolver (none in /etc/resolv.conf, no --trusted-dns): only IP and CIDR rules can match"
        );
    }

    // An earlier run whose agent and guardian both died may have left a
    // process stopped: continue it before anything else.
    for stale in crate::cgroup::stale_runs() {
        let n = guardian::sweep(&stale);
        if n > 0 {
            tracing::warn!(cgroup = %stale.path.display(), continued = n, "continued processes an earlier run left stopped");
        }
        stale.remove_if_empty();
    }
    let cg = Cgroup::create(&format!("run-{}", std::process::id()))?;
    let procs = cg.procs_file()?;
    let guardian = guardian::spawn(Some(&cg), None).context("starting the guardian process")?;

    let probes = Probes::load(&Config {
        backend,
        ring_bytes: o.ring_bytes,
        scrub: o.scrub,
        agent_tgid: std::process::id(),
        max_secrets: (secrets.len() as u32).max(64),
        huffman_signatures: crate::hpack::prefix_signatures(),
    })?;
    for s in &secrets {
        probes.put_secret(&SecretEntry {
            id: s.id,
            placeholder: s.placeholder.as_bytes(),
            value: (backend == Backend::InPlace).then(|| s.value.expose()),
        })?;
    }
    probes.track_cgroup(cg.id)?;
    tracing::info!(backend = backend.as_str(), secrets = secrets.len(), cgroup = %cg.path.display(), trusted_dns = ?trusted, dns_hook = probes.dns_hook().as_str(), "kloak run ready");

    let env: Vec<(String, String)> = secrets
        .iter()
        .map(|s| (s.env.clone(), s.placeholder.clone()))
        .collect();
    let mut agent = Agent::new(&probes, SecretTable::new(secrets), o.scrub)
        .with_busy_poll(std::time::Duration::from_micros(o.busy_poll_us))
        .with_dns(crate::dns::DnsCache::new(trusted, o.dns_cache_entries))
        .with_cgroups(vec![cg.path.clone()]);
    // One span per substitution event when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let audit = match kloak_observability::OtelSettings::from_env(env!("CARGO_PKG_VERSION"), None) {
        Some(s) => {
            Some(kloak_observability::Audit::start(s, 8192).context("starting the span exporter")?)
        }
        None => None,
    };
    if let Some(a) = &audit {
        agent = agent.with_audit(a.clone());
    }
    let counters = agent.counters.clone();
    let shutdown = AtomicBool::new(false);

    let status = std::thread::scope(|sc| -> anyhow::Result<std::process::ExitStatus> {
        sc.spawn(|| {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| agent.run(&shutdown)));
            let msg = match r {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the agent thread panicked".to_string(),
            };
            // Without its agent the command must not meet another stop: exit
            // now; the kernel detaches every probe and the guardian continues
            // anything already stopped. The command runs on, unrewritten.
            eprintln!("kloak: data path failed: {msg}");
            std::process::exit(EXIT_INTERNAL);
        });

        let mut cmd = Command::new(&o.command[0]);
        cmd.args(&o.command[1..]).envs(env);
        kloak_bpf::sys::spawn_into_cgroup(&mut cmd, &procs);
        let spawned = cmd.spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                shutdown.store(true, Ordering::Release);
                return Err(e).with_context(|| format!("starting {:?}", o.command[0]));
            }
        };
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
        shutdown.store(true, Ordering::Release);
        Ok(status?)
    })?;

    // Descendants the command left behind keep running untracked.
    probes.untrack_cgroup(cg.id);
    guardian::sweep(&cg);
    let lost = probes.stats().lost_events;
    if lost > 0 {
        tracing::warn!(
            lost,
            "the tls_events ring buffer was full {lost} time(s); those placeholders went out unchanged (raise --ring-bytes)"
        );
    }
    // What is queued goes out before the counts are written.
    drop(agent);
    let audit_stats = audit.as_ref().map(|a| a.stats.clone());
    if let Some(a) = audit {
        a.finish(std::time::Duration::from_secs(5));
    }
    if let Some(path) = &o.stats_json {
        let s = probes.stats();
        let j = serde_json::json!({
            "backend": backend.as_str(),
            "bpf": {
                "writes": s.writes, "bytes": s.bytes, "hits": s.hits, "unknown": s.unknown,
                "lost_events": s.lost_events, "unreadable": s.unreadable, "overflow": s.overflow,
                "tailcall_failures": s.tailcall_failures, "stops": s.stops, "write_failures": s.write_failures,
                "huffman_candidates": s.huffman_candidates, "splits": s.splits,
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
    drop(probes);
    drop(guardian.pipe);
    cg.remove_if_empty();

    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
