//! The `kloak` binary. Thin: parse arguments, set up logging, hand over.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand};

mod agent;
mod cgroup;
mod discover;
mod doctor;
mod guardian;
mod procmem;
mod run;
mod secrets;

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
    Run {
        /// YAML file listing the secrets.
        #[arg(long)]
        secrets: PathBuf,
        /// Rewrite backend: in-place needs bpf_probe_write_user, pause works under kernel lockdown.
        #[arg(long, value_enum, default_value = "auto")]
        mode: run::Mode,
        /// Put placeholders back into the application's buffer after each write.
        #[arg(long, default_value_t = true, action = ArgAction::Set)]
        scrub: bool,
        /// Size of the tls_events ring buffer in bytes (a power of two).
        #[arg(long, default_value_t = kloak_bpf::DEFAULT_RING_BYTES)]
        ring_bytes: u32,
        /// After a stop, poll for the next event this many microseconds
        /// before sleeping: lower latency per placeholder, some CPU. 0 = off.
        #[arg(long, default_value_t = 200)]
        busy_poll_us: u64,
        /// Write counters (never values) as JSON here when the command exits.
        #[arg(long)]
        stats_json: Option<PathBuf>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Check whether this node can run Kloak.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    #[command(name = "__guardian", hide = true)]
    Guardian {
        #[arg(long)]
        cgroup: PathBuf,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Guardian { cgroup } => ExitCode::from(guardian::run(cgroup) as u8),
        Cmd::Doctor { json } => {
            init_logging("warn");
            let r = doctor::run_checks();
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
        Cmd::Run {
            secrets,
            mode,
            scrub,
            ring_bytes,
            busy_poll_us,
            stats_json,
            command,
        } => {
            init_logging("warn");
            match run::run(run::RunOpts {
                secrets,
                mode,
                scrub,
                ring_bytes,
                busy_poll_us,
                stats_json,
                command,
            }) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("kloak: {e:#}");
                    ExitCode::from(70)
                }
            }
        }
    }
}
