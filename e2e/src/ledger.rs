//! What one whole test run leaves behind for its leak check: every secret
//! value a test made, every agent log, every `/metrics` text an agent
//! served. `scripts/test.sh` points `KLOAK_E2E_RUN_DIR` at a fresh
//! directory, runs every test, then runs `e2e/tests/whole_run.rs`, which
//! greps all of it (and every span in the run's Jaeger) for every value.
//!
//! Without `KLOAK_E2E_RUN_DIR` (a developer running one test) nothing is
//! kept.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const ENV: &str = "KLOAK_E2E_RUN_DIR";

/// The run's directory, when a whole run is being recorded.
pub fn run_dir() -> Option<PathBuf> {
    std::env::var_os(ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn subdir(name: &str) -> Option<PathBuf> {
    let d = run_dir()?.join(name);
    std::fs::create_dir_all(&d).expect("creating the run directory");
    Some(d)
}

/// A file name no other test, thread or test binary of the run will use.
pub fn unique_name(stem: &str, ext: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{stem}-{}-{}.{ext}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Notes a secret value the run must never see in logs, spans or metrics.
pub fn remember_value(v: &str) {
    let Some(d) = run_dir() else { return };
    std::fs::create_dir_all(&d).expect("creating the run directory");
    // One short O_APPEND write per value: lines from parallel tests and
    // test binaries do not interleave.
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join("values"))
        .expect("opening the run's value list");
    f.write_all(format!("{v}\n").as_bytes())
        .expect("noting a value");
}

/// Where a new agent log should go, if the run keeps logs.
pub fn new_log(stem: &str) -> Option<PathBuf> {
    Some(subdir("logs")?.join(unique_name(stem, "log")))
}

/// Keeps a copy of an agent's log file.
pub fn keep_log(stem: &str, path: &Path) {
    if let Some(dst) = new_log(stem) {
        let _ = std::fs::copy(path, dst);
    }
}

/// Keeps an agent log read some other way (`kubectl logs`).
pub fn keep_log_text(stem: &str, text: &str) {
    if let Some(dst) = new_log(stem) {
        std::fs::write(dst, text).expect("keeping a log");
    }
}

/// Keeps a `/metrics` text an agent served.
pub fn keep_metrics(stem: &str, text: &str) {
    if let Some(d) = subdir("metrics") {
        std::fs::write(d.join(unique_name(stem, "txt")), text).expect("keeping /metrics");
    }
}

/// In a recorded run with the run's Jaeger up, every agent exports its
/// spans there (a test may still point one elsewhere), so the leak check
/// reads the spans of the whole run, not just of the observability tests.
pub fn export_spans(c: &mut std::process::Command) {
    if run_dir().is_none() {
        return;
    }
    if let Ok(otlp) = std::env::var("KLOAK_E2E_JAEGER_OTLP") {
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
            .env("OTEL_SERVICE_NAME", "kloak-e2e-run");
    }
}
