//! Audit spans in a real Jaeger: one per substitution event, exported over
//! OTLP/gRPC by the agent, read back through Jaeger's query API. Root only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kloak_e2e::otel::{OwnJaeger, jaeger, tag};
use kloak_e2e::*;

const T: Duration = Duration::from_secs(90);

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

#[test]
fn every_rewrite_and_every_block_is_a_span_in_jaeger() {
    let Some(_g) = root_test() else { return };
    let j = jaeger();
    let srv = TlsServer::start();
    let allowed = random_secret("otel-ok-", 30);
    let denied = random_secret("otel-no-", 30);
    let secrets = Secrets::raw(&format!(
        "secrets:\n  - name: allowed\n    value: \"{allowed}\"\n    env: A\n    hosts: [\"127.0.0.1\"]\n\
         \x20 - name: denied\n    value: \"{denied}\"\n    env: B\n    hosts: [\"192.0.2.1\"]\n"
    ));
    let service = format!("kloak-e2e-{}", std::process::id());
    let py = |env: &str, path: &str| {
        format!(
            "python3 {} request --env {env} --port {} --cacert {} --host 127.0.0.1 --path {path}",
            py_client(),
            srv.port,
            srv.cacert().display()
        )
    };
    let script = format!("{} && {}", py("A", "/allowed"), py("B", "/denied"));
    let before = SystemTime::now();
    let run = run_kloak_with_env(
        &secrets,
        &["--mode", "pause"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &j.otlp),
            ("OTEL_SERVICE_NAME", &service),
        ],
        &["sh", "-c", &script],
        T,
    );
    let after = SystemTime::now();
    assert!(run.output.status.success(), "{}", run.stderr());
    // What arrived: the value where allowed, the placeholder where not.
    let rec = srv.records();
    let got = |path: &str| {
        rec.iter()
            .find(|r| r.starts_with(format!("POST {path} ").as_bytes()))
            .unwrap_or_else(|| panic!("nothing arrived at {path}"))
            .clone()
    };
    assert_eq!(count(&got("/allowed"), allowed.as_bytes()), 2);
    assert_eq!(count(&got("/denied"), denied.as_bytes()), 0);

    let (spans, raw) = j.wait_spans(&service, T, |s| {
        let n = |o: &str| {
            s.iter()
                .filter(|x| tag(x, "kloak.outcome").and_then(|v| v.as_str()) == Some(o))
                .count()
        };
        n("rewritten") >= 2 && n("blocked") >= 2
    });
    let of = |outcome: &str, secret: &str| {
        spans
            .iter()
            .find(|s| {
                tag(s, "kloak.outcome").and_then(|v| v.as_str()) == Some(outcome)
                    && tag(s, "kloak.secret.name").and_then(|v| v.as_str()) == Some(secret)
            })
            .unwrap_or_else(|| panic!("no {outcome} span for {secret}: {raw}"))
    };

    let r = of("rewritten", "allowed");
    let s = |k: &str| tag(r, k).cloned().unwrap_or_default();
    assert_eq!(s("network.peer.address"), "127.0.0.1", "{r}");
    assert_eq!(s("network.peer.port"), srv.port as i64, "{r}");
    assert_eq!(s("server.port"), srv.port as i64, "{r}");
    assert_eq!(s("kloak.backend"), "pause", "{r}");
    assert_eq!(s("kloak.tls.library"), "openssl", "{r}");
    assert!(
        s("code.function.name")
            .as_str()
            .unwrap_or("")
            .starts_with("SSL_write"),
        "{r}"
    );
    assert!(s("kloak.write.bytes").as_i64() > Some(60), "{r}");
    assert!(s("process.pid").as_i64() > Some(0), "{r}");
    assert_eq!(s("process.executable.name"), "python3", "{r}");
    assert!(
        s("process.executable.path")
            .as_str()
            .unwrap_or("")
            .contains("python3"),
        "{r}"
    );
    assert!(s("kloak.pause.duration_us").as_i64() >= Some(0), "{r}");
    assert!(tag(r, "error").is_none(), "a rewrite is not an error: {r}");
    // The span starts when the kernel saw the write: inside the run.
    let start = r["startTime"].as_u64().unwrap();
    assert!(
        start >= micros(before) && start <= micros(after),
        "start {start} outside [{}, {}]",
        micros(before),
        micros(after)
    );
    let proc_tags = r["process"]["tags"].as_array().cloned().unwrap_or_default();
    assert!(
        proc_tags
            .iter()
            .any(|t| t["key"] == "service.version" && t["value"] == env!("CARGO_PKG_VERSION")),
        "resource: {}",
        r["process"]
    );
    assert_eq!(r["process"]["serviceName"], service.as_str());

    let b = of("blocked", "denied");
    assert_eq!(tag(b, "error"), Some(&serde_json::json!(true)), "{b}");
    assert_eq!(
        tag(b, "kloak.blocked.reason").and_then(|v| v.as_str()),
        Some("destination not allowed for this secret"),
        "{b}"
    );
    assert_eq!(
        tag(b, "network.peer.address").cloned(),
        Some("127.0.0.1".into())
    );

    // Names only, never values: not in the spans, not in the agent's output.
    for v in [&allowed, &denied] {
        assert_eq!(count(raw.as_bytes(), v.as_bytes()), 0, "a value in Jaeger");
    }
    run.assert_no_leak(&allowed);
    run.assert_no_leak(&denied);
}

#[test]
fn a_placeholder_cut_across_writes_goes_out_unchanged_as_a_split_span() {
    let Some(_g) = root_test() else { return };
    let j = jaeger();
    let srv = TlsServer::start();
    let value = random_secret("otel-split-", 30);
    let secrets = Secrets::raw(&format!(
        "secrets:\n  - name: cut\n    value: \"{value}\"\n    env: A\n    hosts: [\"127.0.0.1\"]\n"
    ));
    let service = format!("kloak-e2e-split-{}", std::process::id());
    // Cut 3 bytes in ("klo" ends the first write) and 14 bytes in (eight
    // random characters: enough to say whose placeholder it was).
    let cmd = format!(
        "python3 {} split --env A --cuts 3,14 --port {} --cacert {} --host 127.0.0.1",
        py_client(),
        srv.port,
        srv.cacert().display()
    );
    let run = run_kloak_with_env(
        &secrets,
        &["--mode", "pause"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &j.otlp),
            ("OTEL_SERVICE_NAME", &service),
        ],
        &["sh", "-c", &cmd],
        T,
    );
    assert!(run.output.status.success(), "{}", run.stderr());
    let rec = srv.wait_for(2, Duration::from_secs(10));
    for r in &rec {
        // Both halves went out as they were: the whole placeholder, no value.
        let body = &r[r.windows(6).position(|w| w == b"token=").expect("a body") + 6..];
        assert_eq!(body.len(), value.len(), "{}", String::from_utf8_lossy(r));
        assert!(
            body.starts_with(b"kloak:"),
            "{}",
            String::from_utf8_lossy(r)
        );
        assert_eq!(
            count(r, value.as_bytes()),
            0,
            "a cut placeholder must not be half rewritten"
        );
    }

    let (spans, raw) = j.wait_spans(&service, T, |s| {
        s.iter()
            .filter(|x| tag(x, "kloak.outcome").and_then(|v| v.as_str()) == Some("split"))
            .count()
            >= 2
    });
    let split: Vec<_> = spans
        .iter()
        .filter(|x| tag(x, "kloak.outcome").and_then(|v| v.as_str()) == Some("split"))
        .collect();
    assert_eq!(split.len(), 2, "one span per cut write: {raw}");
    let named: Vec<_> = split
        .iter()
        .filter_map(|x| tag(x, "kloak.secret.name").and_then(|v| v.as_str()))
        .collect();
    assert_eq!(
        named,
        ["cut"],
        "only the cut with 8 random characters is named: {raw}"
    );
    for x in &split {
        assert_eq!(
            tag(x, "network.peer.port"),
            Some(&serde_json::json!(srv.port)),
            "{x}"
        );
        assert!(tag(x, "error").is_none(), "nothing was blocked: {x}");
    }
    assert_eq!(
        count(raw.as_bytes(), value.as_bytes()),
        0,
        "a value in Jaeger"
    );
    run.assert_no_leak(&value);
}

/// Peak RSS (KiB) of a `kloak run`, sampled while it runs, with its stats.
fn run_measuring_rss(
    secrets: &Secrets,
    env: &[(&str, &str)],
    command: &[&str],
) -> (std::process::Output, serde_json::Value, u64) {
    use std::process::Stdio;
    let (mut c, stats) = kloak_cmd(secrets, &["--mode", "pause"], command);
    // The baseline exports nothing, whatever the run's defaults.
    c.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let pid = child.id();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0u64;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(kib) = st
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            {
                peak = peak.max(kib);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    let out = child.wait_with_output().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let stats = std::fs::read(&stats)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    (out, stats, peak)
}

/// A collector that is there at first and then stops for good: the agent's
/// exporter loses a live connection mid-run. What it costs in memory is
/// measured over 100,000 events against the same run without export.
#[test]
fn a_collector_stopped_mid_run_costs_bounded_memory_over_100k_events() {
    let Some(_g) = root_test() else { return };
    const EVENTS: usize = 100_000;
    let srv = TlsServer::start();
    let token = random_secret("otel-mem-", 30);
    let secrets = Secrets::raw(&format!(
        "secrets:\n  - name: token\n    value: \"{token}\"\n    env: A\n    hosts: [\"127.0.0.1\"]\n"
    ));
    let py = |args: &str| {
        format!(
            "python3 {} {args} --env A --port {} --cacert {} --host 127.0.0.1",
            py_client(),
            srv.port,
            srv.cacert().display()
        )
    };
    let collector = OwnJaeger::start();
    let service = format!("kloak-e2e-stopped-{}", std::process::id());
    // First a rewrite while the collector is up, until Jaeger shows its
    // span (so the exporter really had a live collector); then the
    // collector is killed and 100,000 events follow.
    let stopped_mid_run = format!(
        "{} && for i in $(seq 100); do \
           curl -sf 'http://{}/api/traces?service={service}' | grep -q '\"kloak rewritten\"' && echo SPAN-SEEN && break; \
           sleep 0.2; done; kill -9 {} && {}",
        py("request --path /before"),
        collector.jaeger.query,
        collector.pid(),
        py(&format!("unknowns --requests {EVENTS}")),
    );
    let baseline = format!(
        "{} && {}",
        py("request --path /before"),
        py(&format!("unknowns --requests {EVENTS}"))
    );
    let mut peaks = Vec::new();
    for (cmd, env) in [
        (&baseline, vec![]),
        (
            &stopped_mid_run,
            vec![
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    collector.jaeger.otlp.as_str(),
                ),
                ("OTEL_SERVICE_NAME", service.as_str()),
            ],
        ),
    ] {
        srv.clear();
        let (out, stats, peak) = run_measuring_rss(&secrets, &env, &["sh", "-c", cmd]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        // The data path kept working: the placeholder after the flood was rewritten.
        let r = srv.wait_for(2, Duration::from_secs(10));
        assert_eq!(r.len(), 2, "both requests arrived");
        for rec in &r {
            assert!(count(rec, token.as_bytes()) >= 1, "the real value arrived");
        }
        assert!(
            stats["bpf"]["unknown"].as_u64() >= Some(EVENTS as u64),
            "{stats}"
        );
        if !env.is_empty() {
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("SPAN-SEEN"),
                "Jaeger never showed the span sent before it stopped: {stderr}"
            );
            let a = &stats["audit"];
            let seen = a["queued"].as_u64().unwrap() + a["dropped_queue_full"].as_u64().unwrap();
            // Events the kernel's ring could not hold never reach the agent.
            let lost = stats["bpf"]["lost_events"].as_u64().unwrap();
            assert!(
                seen + lost >= EVENTS as u64,
                "every event offered: {a}, lost {lost}"
            );
            assert!(
                a["dropped_queue_full"].as_u64() > Some(0)
                    || a["dropped_export_failed"].as_u64() > Some(0),
                "drops are counted: {a}"
            );
        }
        assert_eq!(count(stderr.as_bytes(), token.as_bytes()), 0);
        peaks.push(peak);
    }
    eprintln!(
        "peak RSS over {EVENTS} events: {} KiB without export, {} KiB with the collector stopped mid-run",
        peaks[0], peaks[1]
    );
    assert!(
        peaks[1] < peaks[0] + 48 * 1024,
        "memory grew with the events: {peaks:?} KiB"
    );
}

/// `KLOAK_LOG_FORMAT=json`: every line the agent writes is one JSON object,
/// filtered by `RUST_LOG` like the text format.
#[test]
fn json_logs_are_one_object_per_line_and_follow_rust_log() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("json-log-", 28);
    let secrets = Secrets::raw(&format!(
        "secrets:\n  - name: logged\n    value: \"{value}\"\n    env: A\n    hosts: [\"127.0.0.1\"]\n"
    ));
    let cmd = format!(
        "python3 {} request --env A --port {} --cacert {} --host 127.0.0.1",
        py_client(),
        srv.port,
        srv.cacert().display()
    );
    let lines = |filter: &str| {
        let run = run_kloak_with_env(
            &secrets,
            &["--mode", "pause"],
            &[("KLOAK_LOG_FORMAT", "json"), ("RUST_LOG", filter)],
            &["sh", "-c", &cmd],
            T,
        );
        assert!(run.output.status.success(), "{}", run.stderr());
        run.assert_no_leak(&value);
        run.stderr()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("not a JSON object ({e}): {l}"))
            })
            .collect::<Vec<_>>()
    };
    let message = |l: &serde_json::Value| l["fields"]["message"].as_str().unwrap_or("").to_string();

    let info = lines("info");
    assert!(
        info.iter().any(|l| message(l) == "kloak run ready"
            && l["level"] == "INFO"
            && l["fields"]["backend"] == "pause"),
        "{info:?}"
    );
    assert!(
        info.iter()
            .all(|l| l["timestamp"].is_string() && l["target"].is_string())
    );
    assert!(
        info.iter().all(|l| l["level"] != "DEBUG"),
        "RUST_LOG=info lets a DEBUG line through: {info:?}"
    );

    let debug = lines("warn,kloak::datapath=debug");
    let rewritten = debug
        .iter()
        .find(|l| message(l) == "placeholder rewritten")
        .unwrap_or_else(|| panic!("no rewrite logged: {debug:?}"));
    assert_eq!(rewritten["level"], "DEBUG");
    assert_eq!(rewritten["target"], "kloak::datapath::record");
    assert_eq!(rewritten["fields"]["secret"], "logged", "{rewritten}");
    assert!(
        debug.iter().all(|l| message(l) != "kloak run ready"),
        "an INFO line of another target passed RUST_LOG=warn,kloak::datapath=debug"
    );
    assert_eq!(srv.wait_for(2, Duration::from_secs(5)).len(), 2);
}
