//! The `kloak` binary. Thin: parse arguments, set up logging, hand over.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kloak::cmd::{controller, run, webhook};
use kloak::datapath::guardian;
use kloak::node::doctor;
use kloak_observability::{LogFormat, LogHandle, OtelSettings};

#[derive(Parser)]
#[command(
    name = "kloak",
    version,
    about = "Keeps real secrets out of application processes"
)]
struct Cli {
    /// Log lines as text or JSON (stderr; the filter is RUST_LOG's).
    #[arg(long, global = true, env = "KLOAK_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command whose environment holds placeholders; its TLS writes carry the real values.
    Run(run::RunOpts),
    /// Check whether this node can run Kloak.
    Doctor {
        #[arg(long)]
        json: bool,
        /// Also check a `kloak run` secrets file: valid, and which secrets may go anywhere.
        #[arg(long)]
        secrets: Option<PathBuf>,
    },
    /// The node agent: shadow Secrets, pod attachment, webhook certificate.
    Controller(Box<controller::ControllerOpts>),
    /// The admission webhooks (pod mutation, Secret validation) over HTTPS.
    Webhook(webhook::WebhookOpts),
    #[command(name = "__guardian", hide = true)]
    Guardian {
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// What a successor agent takes over (its state file); read from
        /// this command line by `retire_predecessors`.
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        agent: Option<u32>,
    },
}

/// Logs to stderr; with `otel`, `tracing` spans are exported too. A
/// subscriber that cannot be installed is reported and the command goes on
/// without logs rather than not at all.
fn init_logging(
    format: LogFormat,
    default: &str,
    otel: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
) -> Option<LogHandle> {
    match kloak_observability::logging::init(format, default, otel) {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("kloak: {e}");
            None
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("kloak: starting the async runtime: {e}");
            ExitCode::from(70)
        })
}

fn block_on(
    rt: &tokio::runtime::Runtime,
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kloak: {e:#}");
            ExitCode::from(70)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Guardian { cgroup, .. } => ExitCode::from(guardian::run(cgroup) as u8),
        Cmd::Doctor { json, secrets } => {
            init_logging(cli.log_format, "warn", None);
            let mut r = doctor::run_checks();
            if let Some(path) = secrets {
                doctor::check_secrets(&mut r, &path);
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("report serialises")
                );
            } else {
                doctor::print_text(&r);
            }
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Controller(opts) => {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            // The OTLP exporter needs the runtime it will run on.
            let otel = {
                let _g = rt.enter();
                OtelSettings::from_env(env!("CARGO_PKG_VERSION"), Some(&opts.node))
                    .map(|s| s.tracer_provider().map(|p| (s, p)))
            };
            let (settings, provider) = match otel {
                Some(Ok((s, p))) => (Some(s), Some(p)),
                Some(Err(e)) => {
                    eprintln!("kloak: {e}");
                    return ExitCode::from(70);
                }
                None => (None, None),
            };
            let log = init_logging(cli.log_format, "info", provider.clone());
            let code = block_on(&rt, controller::run(*opts, log, settings));
            if let Some(p) = provider {
                let _ = p.shutdown();
            }
            code
        }
        Cmd::Webhook(opts) => {
            init_logging(cli.log_format, "info", None);
            match runtime() {
                Ok(rt) => block_on(&rt, webhook::run(opts)),
                Err(code) => code,
            }
        }
        Cmd::Run(opts) => {
            init_logging(cli.log_format, "warn", None);
            match run::run(opts) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("kloak: {e:#}");
                    ExitCode::from(70)
                }
            }
        }
    }
}
