//! The leak check over one whole test run: every secret value any test
//! made, searched for in every agent log, every `/metrics` text and every
//! span the run's Jaeger holds. Run by `scripts/test.sh` after all other
//! tests (it needs `--features whole-run` and the run's directory), never on
//! its own: alone it would have nothing to read, and it says so.

use std::path::Path;

use kloak_e2e::count;
use kloak_e2e::ledger::{ENV, run_dir};
use kloak_e2e::otel::jaeger;

/// Standard base64 without the padding: how a Secret's data travels
/// through the API server, and how a careless dump would print it (padded or
/// not, this is a prefix of it).
fn base64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(v)
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
    {
        let p = e.path();
        out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
    }
    out
}

/// Where any value (or its base64) occurs, described without the value.
fn leaks<'a>(
    values: &std::collections::BTreeSet<String>,
    files: impl Iterator<Item = &'a (String, Vec<u8>)>,
) -> Vec<String> {
    // One pass per file for all values and their base64 forms.
    let needles: Vec<(usize, &str, String)> = values
        .iter()
        .flat_map(|v| {
            [
                (v.len(), "value", v.clone()),
                (v.len(), "base64 of a value", base64(v.as_bytes())),
            ]
        })
        .collect();
    let ac = aho_corasick::AhoCorasick::new(needles.iter().map(|(_, _, n)| n.as_bytes()))
        .expect("building the matcher");
    let mut out = Vec::new();
    for (what, bytes) in files {
        for m in ac.find_overlapping_iter(bytes.as_slice()) {
            let (len, form, _) = &needles[m.pattern().as_usize()];
            out.push(format!(
                "{form} of {len} bytes in {what} at byte {}",
                m.start()
            ));
        }
    }
    out
}

#[test]
fn no_secret_value_in_any_log_span_or_metrics_of_the_run() {
    let dir = run_dir().unwrap_or_else(|| {
        panic!("{ENV} is not set: run the whole suite with scripts/test.sh, which runs this last")
    });
    let values: std::collections::BTreeSet<String> = std::fs::read_to_string(dir.join("values"))
        .expect("the run noted its secret values")
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let logs = files(&dir.join("logs"));
    let metrics = files(&dir.join("metrics"));

    let j = jaeger();
    let mut spans = Vec::new();
    let mut nspans = 0;
    for service in j.services() {
        let (s, raw) = j.spans(&service);
        nspans += s.len();
        spans.push((format!("Jaeger service {service}"), raw.into_bytes()));
    }
    eprintln!(
        "whole run: {} secret values, {} agent logs ({} KiB), {} /metrics texts, {nspans} spans",
        values.len(),
        logs.len(),
        logs.iter().map(|(_, b)| b.len()).sum::<usize>() / 1024,
        metrics.len()
    );
    // A run that recorded (almost) nothing would pass without proving
    // anything: these floors are far below what the suite produces.
    assert!(values.len() >= 50, "only {} values noted", values.len());
    assert!(logs.len() >= 50, "only {} agent logs kept", logs.len());
    assert!(metrics.len() >= 5, "only {} /metrics texts", metrics.len());
    assert!(nspans >= 100, "only {nspans} spans in Jaeger");
    assert!(
        logs.iter()
            .any(|(_, b)| count(b, b"placeholder rewritten") > 0),
        "the logs show no rewrite at all"
    );

    let leaks = leaks(&values, logs.iter().chain(&metrics).chain(&spans));
    assert!(
        leaks.is_empty(),
        "secret values leaked:\n{}",
        leaks.join("\n")
    );
}

#[test]
fn a_value_or_its_base64_anywhere_is_found_and_not_printed() {
    let values: std::collections::BTreeSet<String> = [
        "sk-one-0123456789".to_string(),
        "other-value-xyz".to_string(),
    ]
    .into();
    let files = [
        (
            "clean.log".to_string(),
            b"kloak:ABCDEFGHJKMNPQ rewritten".to_vec(),
        ),
        (
            "leak.log".to_string(),
            b"token=sk-one-0123456789\n".to_vec(),
        ),
        (
            "span".to_string(),
            format!("\"{}\"", base64(b"other-value-xyz")).into_bytes(),
        ),
    ];
    let found = leaks(&values, files.iter());
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].contains("leak.log") && found[0].starts_with("value of 17 bytes"));
    assert!(found[1].contains("span") && found[1].starts_with("base64"));
    assert!(
        found
            .iter()
            .all(|f| !f.contains("sk-one") && !f.contains("other-value"))
    );
}
