//! The wire backend end to end: real TLS clients under `kloak run --mode
//! wire`, a real TLS server that records what it decrypted. What arrives
//! proves the kernel's patch of the ciphertext and of the tag: a wrong tag
//! and the server would have dropped the connection instead. Root only.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use kloak_e2e::*;

const T: Duration = Duration::from_secs(90);

fn one_secret(value: &str) -> Secrets {
    Secrets::write(&[("api-token", value, "API_TOKEN")])
}

fn assert_all_real(records: &[Vec<u8>], value: &str, per_request: usize) {
    assert!(!records.is_empty(), "the server received nothing");
    for (i, r) in records.iter().enumerate() {
        assert_eq!(
            count(r, value.as_bytes()),
            per_request,
            "request {i} did not carry the real value {per_request} times: {}",
            String::from_utf8_lossy(r)
        );
        assert_eq!(
            count(r, b"kloak:"),
            0,
            "request {i} still holds a placeholder"
        );
    }
}

fn agent_stat(run: &Run, name: &str) -> u64 {
    run.stats["agent"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no agent.{name} in the stats: {}", run.stats))
}

/// TLS 1.3 and 1.2 with AES-128-GCM, AES-256-GCM and ChaCha20-Poly1305, chosen through curl's
/// flags: every request's header and body arrive real, and every
/// substitution was the wire backend's (none paused).
#[test]
fn curl_gets_the_real_value_over_the_wire_for_every_aead_suite() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("sk-wire-", 40);
    let s = one_secret(&value);
    let suites = [
        (
            "tls13-aes128",
            "--tlsv1.3 --tls13-ciphers TLS_AES_128_GCM_SHA256",
        ),
        (
            "tls13-aes256",
            "--tlsv1.3 --tls13-ciphers TLS_AES_256_GCM_SHA384",
        ),
        (
            "tls12-aes128",
            "--tlsv1.2 --tls-max 1.2 --ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
        ),
        (
            "tls12-aes256",
            "--tlsv1.2 --tls-max 1.2 --ciphers ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
        ),
        (
            "tls13-chacha20",
            "--tlsv1.3 --tls13-ciphers TLS_CHACHA20_POLY1305_SHA256",
        ),
        (
            "tls12-chacha20",
            "--tlsv1.2 --tls-max 1.2 --ciphers ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
        ),
    ];
    for (name, flags) in suites {
        srv.clear();
        let cmd = format!(
            "curl -sS --http1.1 {flags} --cacert {} -H \"Authorization: Bearer $API_TOKEN\" -d \"token=$API_TOKEN\" {}",
            srv.cacert().display(),
            srv.url(&format!("/{name}"))
        );
        let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cmd], T);
        assert!(run.output.status.success(), "{name}: {}", run.stderr());
        assert_all_real(&srv.records(), &value, 2);
        assert_eq!(agent_stat(&run, "wire_armed"), 2, "{name}: {}", run.stats);
        assert_eq!(agent_stat(&run, "rewrites"), 2, "{name}: {}", run.stats);
        assert_eq!(agent_stat(&run, "wire_misses"), 0, "{name}");
        // tc patched at least one packet of each record, dropped none.
        assert!(
            run.stats["bpf"]["wire_packets"].as_u64() >= Some(1),
            "{name}: {}",
            run.stats
        );
        assert_eq!(run.stats["bpf"]["wire_drops"], 0, "{name}: {}", run.stats);
        run.assert_no_leak(&value);
    }
}

/// Clients whose first `SSL_write` runs the end of the handshake, so the key
/// does not exist when the write begins: `openssl s_client` (its handshake
/// runs in a write of zero bytes, then the request's write has its key) and
/// Node (memory BIO: the request's write finishes the handshake, and the
/// Finished and the request leave in one socket write; experimental, behind
/// `--wire-implicit-handshakes true`). Every AEAD suite,
/// TLS 1.3 and 1.2: the value arrives, the wire served it, nothing paused,
/// nothing was dropped; a CBC suite still falls back to pause.
#[test]
fn implicit_handshake_clients_are_served_by_the_wire_for_every_aead_suite() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("sk-implicit-", 40);
    let s = one_secret(&value);
    let ca = srv.cacert().display().to_string();
    let port = srv.port;
    // (name, s_client flags, Node's NODE_TLS and NODE_CIPHERS)
    let suites = [
        (
            "tls13-aes128",
            "-tls1_3 -ciphersuites TLS_AES_128_GCM_SHA256",
            "TLSv1.3",
            "TLS_AES_128_GCM_SHA256",
        ),
        (
            "tls13-aes256",
            "-tls1_3 -ciphersuites TLS_AES_256_GCM_SHA384",
            "TLSv1.3",
            "TLS_AES_256_GCM_SHA384",
        ),
        (
            "tls13-chacha20",
            "-tls1_3 -ciphersuites TLS_CHACHA20_POLY1305_SHA256",
            "TLSv1.3",
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
        (
            "tls12-aes128",
            "-tls1_2 -cipher ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
            "TLSv1.2",
            "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
        ),
        (
            "tls12-aes256",
            "-tls1_2 -cipher ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
            "TLSv1.2",
            "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
        ),
        (
            "tls12-chacha20",
            "-tls1_2 -cipher ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
            "TLSv1.2",
            "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
        ),
    ];
    let node = fixtures().join("node_client.js").display().to_string();
    for (name, sflags, ntls, nciphers) in suites {
        for client in ["s_client", "node"] {
            srv.clear();
            let cmd = if client == "s_client" {
                format!(
                    "printf 'POST /{name} HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\nAuthorization: Bearer %s\\r\\nContent-Length: %d\\r\\n\\r\\ntoken=%s' \"$API_TOKEN\" $((6+${{#API_TOKEN}})) \"$API_TOKEN\" | openssl s_client -connect localhost:{port} -CAfile {ca} -quiet -no_ign_eof {sflags} >/dev/null 2>&1"
                )
            } else {
                format!(
                    "NODE_TLS={ntls} NODE_CIPHERS={nciphers} node {node} {port} {ca} /{name} 2 >/dev/null"
                )
            };
            // Node's path is experimental, behind its flag.
            let args: &[&str] = if client == "node" {
                &["--mode", "wire", "--wire-implicit-handshakes", "true"]
            } else {
                &["--mode", "wire"]
            };
            let run = run_kloak(&s, args, &["sh", "-c", &cmd], T);
            assert!(
                run.output.status.success(),
                "{client} {name}: {}",
                run.stderr()
            );
            let n = if client == "node" { 2 } else { 1 };
            let rec = srv.wait_for(n, Duration::from_secs(5));
            assert_eq!(rec.len(), n, "{client} {name}");
            assert_all_real(&rec, &value, 2);
            let what = format!("{client} {name}: {}", run.stats);
            assert_eq!(agent_stat(&run, "wire_armed"), 2 * n as u64, "{what}");
            assert_eq!(agent_stat(&run, "rewrites"), 2 * n as u64, "{what}");
            assert_eq!(agent_stat(&run, "wire_misses"), 0, "{what}");
            assert_eq!(run.stats["bpf"]["wire_fallbacks"], 0, "{what}");
            assert_eq!(run.stats["bpf"]["wire_drops"], 0, "{what}");
            run.assert_no_leak(&value);
        }
    }
    // CBC: not the wire's; pause serves it (the secret has no rules).
    srv.clear();
    let cmd = format!(
        "printf 'POST /cbc HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\nAuthorization: Bearer %s\\r\\nContent-Length: 0\\r\\n\\r\\n' \"$API_TOKEN\" | openssl s_client -connect localhost:{port} -CAfile {ca} -quiet -no_ign_eof -tls1_2 -cipher ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256 >/dev/null 2>&1"
    );
    let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let rec = srv.wait_for(1, Duration::from_secs(5));
    assert_eq!(count(&rec[0], value.as_bytes()), 1);
    assert_eq!(agent_stat(&run, "wire_armed"), 0, "{}", run.stats);
    assert_eq!(run.stats["bpf"]["wire_fallbacks"], 1, "{}", run.stats);
    run.assert_no_leak(&value);
}

/// An OpenSSL configuration file that limits TLS 1.3 to ChaCha20-Poly1305,
/// for clients that cannot choose TLS 1.3 suites themselves (Python).
fn chacha_only_conf(dir: &std::path::Path) -> String {
    tls13_only_conf(dir, "TLS_CHACHA20_POLY1305_SHA256")
}

/// An OpenSSL configuration file that limits TLS 1.3 to `suite`: for a
/// client (Python) or for the recording server, when the client (Go)
/// cannot choose TLS 1.3 suites.
fn tls13_only_conf(dir: &std::path::Path, suite: &str) -> String {
    let p = dir.join(format!("{suite}.cnf"));
    std::fs::write(
        &p,
        format!(
            "openssl_conf = conf\n[conf]\nssl_conf = ssl\n[ssl]\nsystem_default = sys\n\
             [sys]\nCiphersuites = {suite}\n"
        ),
    )
    .unwrap();
    p.display().to_string()
}

/// Python, keep-alive, TLS 1.3 (default suite and ChaCha20-Poly1305) and
/// TLS 1.2 (AES-128-GCM and ChaCha20-Poly1305):
/// every request arrives real, while the application never holds the value:
/// a thread comparing the written buffer never sees it change, its SIGCONT
/// handler never runs (nothing was stopped), and afterwards its whole memory
/// holds no copy.
#[test]
fn python_never_holds_the_value_and_is_never_stopped() {
    let Some(_g) = root_test() else { return };
    for (name, extra) in [
        ("tls13", vec![]),
        ("tls13-chacha20", vec![]),
        (
            "tls12",
            vec![
                "--tls12",
                "--ciphers",
                "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
            ],
        ),
        (
            "tls12-chacha20",
            vec![
                "--tls12",
                "--ciphers",
                "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
            ],
        ),
    ] {
        let srv = TlsServer::start();
        let value = random_secret("py-wire-", 32);
        let s = one_secret(&value);
        let mut args = Vec::new();
        if name == "tls13-chacha20" {
            args.push("env".to_string());
            args.push(format!("OPENSSL_CONF={}", chacha_only_conf(s.dir.path())));
        }
        args.extend(py_cmd("watched", &srv, &["--requests", "50"]));
        args.extend(extra.iter().map(|s| s.to_string()));
        let (mut c, _) = kloak_cmd(&s, &["--mode", "wire"], &strs(&args));
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("{name}: no {k} in {line:?}"))
                .to_string()
        };
        let pid: u32 = field("pid=").parse().unwrap();
        assert_eq!(
            field("changed="),
            "0",
            "{name}: the buffer changed under the app"
        );
        assert_eq!(
            field("sigcont="),
            "0",
            "{name}: the app was stopped and continued"
        );
        let expect = if name.starts_with("tls13") {
            "TLSv1.3"
        } else {
            "TLSv1.2"
        };
        assert_eq!(field("version="), expect, "{name}");
        let suite = if name.ends_with("chacha20") {
            "CHACHA20"
        } else {
            "GCM"
        };
        assert!(field("cipher=").contains(suite), "{name}: {line}");
        let mem = memory_of(pid);
        assert!(
            mem.len() > 1 << 20,
            "{name}: read too little of the client's memory"
        );
        assert_eq!(
            count(&mem, value.as_bytes()),
            0,
            "{name}: the real value is in the client's memory"
        );
        child.stdin.take().unwrap().write_all(b"\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(count(&out.stderr, value.as_bytes()), 0);
        let rec = srv.wait_for(50, Duration::from_secs(10));
        assert_eq!(rec.len(), 50, "{name}");
        assert_all_real(&rec, &value, 2);
    }
}

/// A CBC suite is not the wire's to patch: the pause backend serves it,
/// and the value still arrives.
#[test]
fn a_cbc_suite_falls_back_to_pause() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("sk-cbc-", 30);
    let s = one_secret(&value);
    let cmd = format!(
        "curl -sS --http1.1 --tlsv1.2 --tls-max 1.2 --ciphers ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256 --cacert {} -H \"Authorization: Bearer $API_TOKEN\" {}",
        srv.cacert().display(),
        srv.url("/cbc")
    );
    let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert_all_real(&srv.records(), &value, 1);
    assert_eq!(agent_stat(&run, "wire_armed"), 0, "{}", run.stats);
    assert_eq!(agent_stat(&run, "rewrites"), 1, "{}", run.stats);
    assert_eq!(run.stats["bpf"]["wire_fallbacks"], 1, "{}", run.stats);
    run.assert_no_leak(&value);
}

/// A destination the secret's rules do not allow gets the placeholder: the
/// kernel arms nothing for it, and the agent counts the block.
#[test]
fn a_destination_not_allowed_gets_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("sk-deny-", 30);
    let s = Secrets::raw(&format!(
        "secrets:\n  - name: api-token\n    value: \"{value}\"\n    env: API_TOKEN\n    hosts: [\"10.9.9.9\"]\n"
    ));
    let cmd = format!(
        "curl -sS --http1.1 --cacert {} -H \"Authorization: Bearer $API_TOKEN\" {}",
        srv.cacert().display(),
        srv.url("/deny")
    );
    let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let rec = srv.records();
    assert_eq!(rec.len(), 1);
    assert_eq!(
        count(&rec[0], value.as_bytes()),
        0,
        "the value reached a refused destination"
    );
    assert_eq!(placeholders_in(&rec[0], value.len()).len(), 1);
    assert_eq!(agent_stat(&run, "wire_armed"), 0);
    assert_eq!(agent_stat(&run, "blocked"), 1, "{}", run.stats);
    run.assert_no_leak(&value);
}

/// One write of 100 KiB (seven records) with placeholders at the scan's
/// chunk edges and at the very end, and one of 40 KiB whose placeholders
/// are cut by the records' 16 KiB boundaries: each part is patched in its
/// own record, each record's tag corrected; with AES-GCM, and with
/// ChaCha20-Poly1305, whose tags are recomputed record by record.
#[test]
fn large_writes_and_placeholders_cut_by_record_boundaries_arrive_real() {
    let Some(_g) = root_test() else { return };
    for (mode, expected, chacha) in [
        ("edges", 5, false),
        ("records", 6, false),
        ("edges", 5, true),
        ("records", 6, true),
    ] {
        let srv = TlsServer::start();
        let value = random_secret(&format!("{mode}-"), 30);
        let s = one_secret(&value);
        let mut args = Vec::new();
        if chacha {
            args.push("env".to_string());
            args.push(format!("OPENSSL_CONF={}", chacha_only_conf(s.dir.path())));
        }
        args.extend(py_cmd(mode, &srv, &[]));
        let run = run_kloak(&s, &["--mode", "wire"], &strs(&args), T);
        assert_eq!(
            run.stats["bpf"]["wire_unproven"], 0,
            "{mode}: {}",
            run.stats
        );
        assert!(run.output.status.success(), "{mode}: {}", run.stderr());
        assert!(
            run.stdout().contains(&format!("placeholders={expected}")),
            "{}",
            run.stdout()
        );
        let rec = srv.records();
        assert_eq!(rec.len(), 1, "{mode}");
        assert_eq!(
            count(&rec[0], value.as_bytes()),
            expected,
            "{mode}: every placeholder real"
        );
        assert_eq!(count(&rec[0], b"kloak:"), 0, "{mode}");
        assert_eq!(
            agent_stat(&run, "wire_armed"),
            expected as u64,
            "{mode}: {}",
            run.stats
        );
        run.assert_no_leak(&value);
    }
}

/// A `requireWire` secret is never served by `pause`: on a CBC write (which
/// only `pause` could serve) its placeholder goes out unchanged and counted,
/// while an ordinary secret in the same request is still paused and arrives
/// real. On an AEAD suite the same secret arrives real, from the wire.
#[test]
fn a_require_wire_secret_on_a_write_only_pause_could_serve_goes_out_as_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let strict = random_secret("sk-strict-", 30);
    let plain = random_secret("sk-plain-", 30);
    let s = Secrets::raw(&format!(
        "secrets:\n  - name: strict\n    value: \"{strict}\"\n    env: STRICT\n    requireWire: true\n  - name: plain\n    value: \"{plain}\"\n    env: PLAIN\n"
    ));
    let curl = |flags: &str, path: &str| {
        format!(
            "curl -sS --http1.1 {flags} --cacert {} -H \"Authorization: Bearer $STRICT\" -H \"X-Other: $PLAIN\" {}",
            srv.cacert().display(),
            srv.url(path)
        )
    };
    let cbc = curl(
        "--tlsv1.2 --tls-max 1.2 --ciphers ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256",
        "/cbc",
    );
    let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cbc], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let rec = srv.records();
    assert_eq!(rec.len(), 1);
    assert_eq!(
        count(&rec[0], strict.as_bytes()),
        0,
        "pause served a requireWire secret"
    );
    assert_eq!(
        placeholders_in(&rec[0], strict.len()).len(),
        1,
        "{}",
        String::from_utf8_lossy(&rec[0])
    );
    assert_eq!(
        count(&rec[0], plain.as_bytes()),
        1,
        "the ordinary secret was not paused in"
    );
    assert_eq!(run.stats["bpf"]["require_wire"], 1, "{}", run.stats);
    assert_eq!(agent_stat(&run, "rewrites"), 1, "{}", run.stats);
    run.assert_no_leak(&strict);
    run.assert_no_leak(&plain);

    let srv = TlsServer::start();
    let aead = format!(
        "curl -sS --http1.1 --cacert {} -H \"Authorization: Bearer $STRICT\" {}",
        srv.cacert().display(),
        srv.url("/gcm")
    );
    let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &aead], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert_all_real(&srv.records(), &strict, 1);
    assert_eq!(run.stats["bpf"]["require_wire"], 0, "{}", run.stats);
    assert_eq!(agent_stat(&run, "wire_armed"), 1, "{}", run.stats);
    assert_eq!(run.stats["bpf"]["wire_fallbacks"], 0, "{}", run.stats);
    run.assert_no_leak(&strict);
}

/// A loopback that drops 5% of the packets arriving on it (iptables
/// `statistic`; this kernel has no netem), in a network namespace of its
/// own: TCP retransmits from its own unpatched send queue, and every copy
/// must carry the same patch. 300 keep-alive requests on one connection with
/// AES-GCM, and 100 with ChaCha20-Poly1305, all arrive real on the
/// connection they started on (a wrongly patched retransmission would fail
/// its tag and the server would drop the connection).
#[test]
fn on_a_lossy_loopback_every_retransmission_carries_the_patch() {
    let Some(_g) = root_test() else { return };
    for (name, requests, chacha) in [("aes-gcm", 300, false), ("chacha20", 100, true)] {
        let ns = Netns::new("kloak-loss");
        ns.run(
            &[
                "iptables",
                "-A",
                "INPUT",
                "-i",
                "lo",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.05",
                "-j",
                "DROP",
            ],
            true,
        );
        let srv = TlsServer::start_in(&ns);
        let value = random_secret("sk-loss-", 36);
        let s = one_secret(&value);
        let lat = s.dir.path().join("latencies.json");
        let mut args = Vec::new();
        if chacha {
            args.push("env".to_string());
            args.push(format!("OPENSSL_CONF={}", chacha_only_conf(s.dir.path())));
        }
        let n = requests.to_string();
        let out = lat.display().to_string();
        args.extend(py_cmd("bench", &srv, &["--requests", &n, "--out", &out]));
        let retrans_before = ns.snmp("Tcp", "RetransSegs");
        let run = run_kloak_in(&ns, &s, &["--mode", "wire"], &strs(&args), T * 3);
        assert!(run.output.status.success(), "{name}: {}", run.stderr());
        let retrans = ns.snmp("Tcp", "RetransSegs") - retrans_before;
        assert!(
            retrans > 0,
            "{name}: no segment was retransmitted; the loss rule did not bite"
        );
        let rec = srv.wait_for(requests, Duration::from_secs(10));
        assert_eq!(rec.len(), requests, "{name}: requests lost");
        assert_all_real(&rec, &value, 2);
        let conns: std::collections::BTreeSet<_> =
            std::fs::read_to_string(srv.dir.path().join("record.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["conn"]
                        .clone()
                        .to_string()
                })
                .collect();
        assert_eq!(conns.len(), 1, "{name}: the connection broke: {conns:?}");
        let armed = agent_stat(&run, "wire_armed");
        assert!(armed >= requests as u64, "{name}: {}", run.stats);
        assert_eq!(agent_stat(&run, "rewrites"), armed, "{name}: {}", run.stats);
        assert_eq!(
            run.stats["bpf"]["wire_fallbacks"], 0,
            "{name}: {}",
            run.stats
        );
        assert_eq!(
            run.stats["bpf"]["wire_unproven"], 0,
            "{name}: {}",
            run.stats
        );
        eprintln!(
            "{name}: {requests} requests, {retrans} segments retransmitted, {} packets patched, {} dropped",
            run.stats["bpf"]["wire_packets"], run.stats["bpf"]["wire_drops"]
        );
        run.assert_no_leak(&value);
    }
}

/// IPv6: a server bound to `::1` only, curl with AES-GCM and
/// ChaCha20-Poly1305 (TLS 1.3 and 1.2) and Python keep-alive: the value
/// arrives real, from the wire, on flows the kernel keys by 16-byte
/// addresses.
#[test]
fn ipv6_connections_get_the_real_value_over_the_wire() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start_on(&["::1"]);
    let value = random_secret("sk-v6-", 34);
    let s = one_secret(&value);
    for (name, flags) in [
        (
            "tls13-aes128",
            "--tlsv1.3 --tls13-ciphers TLS_AES_128_GCM_SHA256",
        ),
        (
            "tls13-chacha20",
            "--tlsv1.3 --tls13-ciphers TLS_CHACHA20_POLY1305_SHA256",
        ),
        (
            "tls12-aes256",
            "--tlsv1.2 --tls-max 1.2 --ciphers ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
        ),
    ] {
        srv.clear();
        let cmd = format!(
            "curl -6 -sS --http1.1 {flags} --cacert {} -H \"Authorization: Bearer $API_TOKEN\" -d \"token=$API_TOKEN\" {}",
            srv.cacert().display(),
            srv.url(&format!("/{name}"))
        );
        let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cmd], T);
        assert!(run.output.status.success(), "{name}: {}", run.stderr());
        assert_all_real(&srv.records(), &value, 2);
        assert_eq!(agent_stat(&run, "wire_armed"), 2, "{name}: {}", run.stats);
        assert_eq!(agent_stat(&run, "rewrites"), 2, "{name}: {}", run.stats);
        assert_eq!(run.stats["bpf"]["wire_drops"], 0, "{name}: {}", run.stats);
        run.assert_no_leak(&value);
    }
    srv.clear();
    let lat = s.dir.path().join("latencies.json").display().to_string();
    let run = run_kloak(
        &s,
        &["--mode", "wire"],
        &strs(&py_cmd(
            "bench",
            &srv,
            &["--requests", "50", "--out", &lat, "--ip", "::1"],
        )),
        T,
    );
    assert!(run.output.status.success(), "python: {}", run.stderr());
    let rec = srv.wait_for(50, Duration::from_secs(10));
    assert_eq!(rec.len(), 50);
    assert_all_real(&rec, &value, 2);
    assert_eq!(
        agent_stat(&run, "rewrites"),
        agent_stat(&run, "wire_armed"),
        "python: {}",
        run.stats
    );
    assert_eq!(
        run.stats["bpf"]["wire_fallbacks"], 0,
        "python: {}",
        run.stats
    );
    run.assert_no_leak(&value);
}

/// A recording server whose TLS 1.3 is limited to `tls13` (None: any), so
/// that a Go client, which cannot choose TLS 1.3 suites, gets that one.
fn server_for(tls13: Option<&str>) -> (TlsServer, Option<tempfile::TempDir>) {
    let Some(suite) = tls13 else {
        return (TlsServer::start(), None);
    };
    let d = tempfile::tempdir().unwrap();
    let conf = tls13_only_conf(d.path(), suite);
    (
        TlsServer::start_with_env(&["127.0.0.1"], &[("OPENSSL_CONF", &conf)]),
        Some(d),
    )
}

/// Every placeholder of the Go client's run was armed on the wire: none
/// paused, none missed, no packet dropped, no ChaCha20 record unproven, and
/// the client itself saw no SIGCONT (its exec's stop comes before its
/// handler; any later stop would be counted).
fn assert_wire_only(run: &Run, name: &str, armed: u64) {
    assert!(
        run.stdout().contains(" sigcont=0"),
        "{name}: the Go client was stopped: {} {}\n{}",
        run.stdout(),
        run.stats,
        run.stderr()
    );
    assert_eq!(
        agent_stat(run, "wire_armed"),
        armed,
        "{name}: {}",
        run.stats
    );
    assert_eq!(agent_stat(run, "rewrites"), armed, "{name}: {}", run.stats);
    for k in ["wire_misses", "wire_decisions", "user_scans"] {
        assert_eq!(agent_stat(run, k), 0, "{name}: agent.{k}: {}", run.stats);
    }
    for k in ["wire_fallbacks", "wire_drops", "wire_unproven"] {
        assert_eq!(run.stats["bpf"][k], 0, "{name}: bpf.{k}: {}", run.stats);
    }
    assert!(
        run.stats["bpf"]["wire_packets"].as_u64() >= Some(1),
        "{name}: {}",
        run.stats
    );
}

/// Go `crypto/tls` (net/http, keep-alive, three requests on one
/// connection): TLS 1.3 with each of its three suites (the server limits
/// them; Go's client cannot) and TLS 1.2 with each AEAD through Go's
/// `CipherSuites`. Every header and body arrives real, the process is never
/// stopped, and the suite is the one meant.
#[test]
fn go_gets_the_real_value_over_the_wire_for_every_aead_suite() {
    let Some(_g) = root_test() else { return };
    let cases: [(&str, Option<&str>, &[&str], &str); 6] = [
        (
            "tls13-aes128",
            Some("TLS_AES_128_GCM_SHA256"),
            &[],
            "TLS_AES_128_GCM_SHA256",
        ),
        (
            "tls13-aes256",
            Some("TLS_AES_256_GCM_SHA384"),
            &[],
            "TLS_AES_256_GCM_SHA384",
        ),
        (
            "tls13-chacha20",
            Some("TLS_CHACHA20_POLY1305_SHA256"),
            &[],
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
        (
            "tls12-aes128",
            None,
            &["-tls12", "-suite", "aes128"],
            "_WITH_AES_128_GCM_SHA256",
        ),
        (
            "tls12-aes256",
            None,
            &["-tls12", "-suite", "aes256"],
            "_WITH_AES_256_GCM_SHA384",
        ),
        (
            "tls12-chacha20",
            None,
            &["-tls12", "-suite", "chacha20"],
            "_WITH_CHACHA20_POLY1305_SHA256",
        ),
    ];
    for (name, tls13, flags, suite) in cases {
        let (srv, _conf) = server_for(tls13);
        let value = random_secret(&format!("go-{name}-"), 36);
        let s = one_secret(&value);
        let cmd = format!(
            "{} -url {} -cacert {} -n 3 {}",
            go_client().display(),
            srv.url(&format!("/{name}")),
            srv.cacert().display(),
            flags.join(" ")
        );
        let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cmd], T);
        assert!(run.output.status.success(), "{name}: {}", run.stderr());
        let out = run.stdout();
        let version = if name.starts_with("tls13") {
            "TLS 1.3"
        } else {
            "TLS 1.2"
        };
        assert!(
            out.contains(&format!("version={version} ")) && out.contains(suite),
            "{name}: negotiated {out}"
        );
        let rec = srv.records();
        assert_eq!(rec.len(), 3, "{name}");
        assert_all_real(&rec, &value, 2);
        assert_wire_only(&run, name, 6);
        run.assert_no_leak(&value);
    }
}

/// A Go binary stripped of its symbols (`-ldflags=-s -w`): the key route's
/// functions are found through `.gopclntab` like its write, and the wire
/// serves it.
#[test]
fn a_stripped_go_binary_is_served_by_the_wire() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("go-stripped-", 30);
    let s = one_secret(&value);
    let cmd = format!(
        "{} -url {} -cacert {} -n 2",
        stripped_go_client().display(),
        srv.url("/stripped"),
        srv.cacert().display()
    );
    let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert_all_real(&srv.records(), &value, 2);
    assert_wire_only(&run, "stripped", 4);
    run.assert_no_leak(&value);
}

/// 100 KiB bodies with the placeholder near the end: Go's dynamic record
/// sizing cuts them into dozens of ~1.4 KB records (one socket write each),
/// and the record that carries the placeholder is patched; with AES-GCM,
/// and with ChaCha20-Poly1305, whose sequence number Go's encrypt counts.
#[test]
fn go_large_bodies_in_small_dynamic_records_arrive_real() {
    let Some(_g) = root_test() else { return };
    for (name, tls13) in [
        ("aes128", "TLS_AES_128_GCM_SHA256"),
        ("chacha20", "TLS_CHACHA20_POLY1305_SHA256"),
    ] {
        let (srv, _conf) = server_for(Some(tls13));
        let value = random_secret(&format!("go-big-{name}-"), 40);
        let s = one_secret(&value);
        let cmd = format!(
            "{} -url {} -cacert {} -n 3 -size 102400 -tail",
            go_client().display(),
            srv.url(&format!("/big-{name}")),
            srv.cacert().display()
        );
        let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cmd], T);
        assert!(run.output.status.success(), "{name}: {}", run.stderr());
        let rec = srv.records();
        assert_eq!(rec.len(), 3, "{name}");
        for r in &rec {
            assert!(r.len() > 102400, "{name}: the body arrived whole");
            let at = r
                .windows(value.len())
                .rposition(|w| w == value.as_bytes())
                .unwrap_or_else(|| panic!("{name}: no real value in the body"));
            assert!(at > 102400, "{name}: the body's value is near its end");
        }
        assert_all_real(&rec, &value, 2);
        assert_wire_only(&run, name, 6);
        run.assert_no_leak(&value);
    }
}

/// Go over HTTP/2 (ALPN h2, the recording h2 server): header and body
/// arrive real. HPACK Huffman-codes the header value, so the kernel's scan
/// cannot find it and that write is served by `pause` (a user-space scan);
/// DATA frames carry the body's placeholder in clear and are the wire's.
#[test]
fn go_http2_body_is_served_by_the_wire_and_its_huffman_header_by_pause() {
    let Some(_g) = root_test() else { return };
    let srv = H2Server::start();
    let value = random_secret("go-h2-wire-", 32);
    let s = one_secret(&value);
    let cmd = format!(
        "{} -h2 -url https://localhost:{}/h2 -cacert {} -n 2",
        go_client().display(),
        srv.port,
        srv.cacert().display()
    );
    let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let records = srv.records();
    assert_eq!(records.len(), 2, "{}", run.stats);
    let expected = format!("Bearer {value}");
    for r in &records {
        assert!(r.get("error").is_none(), "HPACK: {r}");
        assert_eq!(r["headers"]["authorization"], expected.as_str());
        let body = r["body"].as_str().unwrap();
        assert!(body.contains(&value) && !body.contains("kloak:"), "{r}");
    }
    // Two bodies on the wire; one Huffman-coded header (the second request
    // names it from HPACK's dynamic table) by a pause and a user-space scan.
    assert_eq!(agent_stat(&run, "wire_armed"), 2, "{}", run.stats);
    assert_eq!(agent_stat(&run, "huffman_rewrites"), 1, "{}", run.stats);
    assert_eq!(agent_stat(&run, "user_scans"), 1, "{}", run.stats);
    assert_eq!(agent_stat(&run, "wire_misses"), 0, "{}", run.stats);
    assert_eq!(run.stats["bpf"]["wire_fallbacks"], 1, "{}", run.stats);
    assert_eq!(run.stats["bpf"]["wire_drops"], 0, "{}", run.stats);
    run.assert_no_leak(&value);
}

/// Two Kloaks on one host: while one `kloak run` holds its tc programs on
/// loopback, another one's client is still served by the wire. Each program
/// hands packets on to the next (TCX_NEXT) and attaches first; one that
/// ended the chain (TC_ACT_OK is TCX_PASS) hid every packet from the other,
/// which learned no suite and paused every write.
#[test]
fn a_second_kloak_on_the_host_still_serves_the_wire() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("sk-second-", 30);
    let s = one_secret(&value);
    let other = one_secret("sk-first-0123456789");
    let (mut first, _) = kloak_cmd(&other, &["--mode", "wire"], &["sleep", "60"]);
    let mut first = first
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Ready once it says so: its tc programs are on loopback by then.
    let mut err = BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("kloak run ready") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the first kloak run ended"
        );
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let cmd = format!(
        "curl -sS --http1.1 --cacert {} -H \"Authorization: Bearer $API_TOKEN\" {}",
        srv.cacert().display(),
        srv.url("/second")
    );
    let run = run_kloak(&s, &["--mode", "wire"], &["sh", "-c", &cmd], T);
    let _ = first.kill();
    let _ = first.wait();
    assert!(run.output.status.success(), "{}", run.stderr());
    assert_all_real(&srv.records(), &value, 1);
    assert_eq!(agent_stat(&run, "wire_armed"), 1, "{}", run.stats);
    assert_eq!(run.stats["bpf"]["wire_fallbacks"], 0, "{}", run.stats);
    run.assert_no_leak(&value);
}

/// The Python client of the KeyUpdate test: three lines on one connection,
/// each after reading the server's line (and the KeyUpdate before it).
const PY_LINES: &str = r#"
import socket, ssl, sys, os
ctx = ssl.create_default_context(cafile=sys.argv[2])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="localhost")
f = s.makefile("rb")
for i in range(3):
    if i:
        f.readline()
    s.sendall(b"line=%d token=%s\n" % (i, os.environ["API_TOKEN"].encode()))
print("LINES 3")
"#;

/// TLS 1.3 KeyUpdate: after each line the server (openssl s_server) sends a
/// KeyUpdate that asks for one back, so the client's next line goes out
/// under a new traffic key. Go (its handleKeyUpdate probe) follows it: every
/// line arrives real, which a tag corrected with a stale key would not (the
/// server would fail the record). OpenSSL answers inside the next SSL_write,
/// whose first socket write is then its own KeyUpdate record, not the
/// write's data; the wire does not follow that yet, so those lines go out
/// with the placeholder, counted as misses, and the stream stays valid (the
/// server decrypted them). Never the value under a wrong tag.
#[test]
fn after_a_key_update_go_is_patched_under_the_new_key_and_openssl_sends_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let d = tempfile::tempdir().unwrap();
    make_certificates(d.path(), &["127.0.0.1"]);
    let py = d.path().join("lines.py");
    std::fs::write(&py, PY_LINES).unwrap();
    let ca = d.path().join("ca.pem");
    for client in ["go", "python"] {
        let rec = d.path().join(format!("{client}.txt"));
        let mut c = std::process::Command::new("python3");
        c.arg(fixtures().join("keyupdate_server.py"))
            .arg("--cert")
            .arg(d.path().join("cert.pem"))
            .arg("--key")
            .arg(d.path().join("key.pem"))
            .args(["--lines", "3", "--record"])
            .arg(&rec);
        let (mut srv, port) = spawn_listening(&mut c, "the KeyUpdate server");
        let value = random_secret(&format!("ku-{client}-"), 30);
        let cmd = if client == "go" {
            format!(
                "{} -url https://127.0.0.1:{port}/ -cacert {} -lines 3",
                go_client().display(),
                ca.display()
            )
        } else {
            format!("python3 {} {port} {}", py.display(), ca.display())
        };
        let run = run_kloak(
            &one_secret(&value),
            &["--mode", "wire"],
            &["sh", "-c", &cmd],
            T,
        );
        assert!(run.output.status.success(), "{client}: {}", run.stderr());
        let _ = srv.wait();
        let got = std::fs::read(&rec).unwrap();
        let text = String::from_utf8_lossy(&got);
        let go = client == "go";
        let placeholder = placeholders_in(&got, value.len()).pop();
        for i in 0..3 {
            // Python: the line before any KeyUpdate is the wire's; the ones
            // after, not yet (see above).
            let expect = if go || i == 0 {
                Some(value.clone())
            } else {
                placeholder.clone()
            };
            assert!(
                expect.is_some_and(|t| text.contains(&format!("line={i} token={t}\n"))),
                "{client}: line {i} did not arrive as expected: {text}"
            );
        }
        assert_eq!(
            count(&got, b"SSL_do_handshake -> 1"),
            2,
            "{client}: the server did not send its two KeyUpdates: {text}"
        );
        let (armed, missed) = if go { (3, 0) } else { (1, 2) };
        assert_eq!(
            run.stats["bpf"]["wire_armed"], armed,
            "{client}: {}",
            run.stats
        );
        assert_eq!(
            run.stats["bpf"]["wire_misses"], missed,
            "{client}: {}",
            run.stats
        );
        assert_eq!(
            run.stats["bpf"]["wire_fallbacks"], 0,
            "{client}: {}",
            run.stats
        );
        run.assert_no_leak(&value);
    }
}
