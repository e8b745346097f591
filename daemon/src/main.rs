//! The `kloak` binary. Thin: parse arguments, set up logging, hand over.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kloak::{controller, doctor, guardian, run, webhook};

#[derive(Parser)]
#[command(
    name = "kloak",
    version,
    about = "Keeps real secrets out of application processes"
)]
struct Cli {
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
    Controller(controller::ControllerOpts),
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

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn async_main(f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kloak: starting the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
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
            init_logging("warn");
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
            init_logging("info");
            async_main(controller::run(opts))
        }
        Cmd::Webhook(opts) => {
            init_logging("info");
            async_main(webhook::run(opts))
        }
        Cmd::Run(opts) => {
            init_logging("warn");
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
