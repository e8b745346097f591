//! DNS-verified destination filtering, end to end: a real DNS server
//! (dnsmasq), clients resolving through it in a private mount namespace, and
//! the recording TLS server on four loopback addresses. Root only.

use std::time::Duration;

use kloak_e2e::*;

const T: Duration = Duration::from_secs(90);
const RESOLVER: &str = "127.0.0.153";
const FORGER: &str = "127.0.0.154";
const ADDRS: &[&str] = &["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"];

fn zone(ttl: u32) -> DnsServer {
    DnsServer::start(
        RESOLVER,
        &[
            ("allowed.test", "127.0.0.2", ttl),
            ("other.test", "127.0.0.3", ttl),
            ("api.svc.test", "127.0.0.4", ttl),
        ],
    )
}

/// One secret per rule set, each in its own variable; values differ per run.
struct Fixture {
    secrets: Secrets,
    values: Vec<(String, String)>, // (env, value)
}

impl Fixture {
    fn new(rules: &[(&str, &str)]) -> Fixture {
        let mut y = String::from("secrets:\n");
        let mut values = Vec::new();
        for (i, (env, rule)) in rules.iter().enumerate() {
            let v = random_secret(&format!("dest{i}-"), 30);
            y.push_str(&format!(
                "  - name: s{i}\n    value: \"{v}\"\n    env: {env}\n{rule}"
            ));
            values.push((env.to_string(), v));
        }
        Fixture {
            secrets: Secrets::raw(&y),
            values,
        }
    }

    fn value(&self, env: &str) -> &str {
        &self.values.iter().find(|(e, _)| e == env).unwrap().1
    }
}

/// The request sent to `path` carried the real value (true) or its placeholder (false).
fn arrived_real(srv: &TlsServer, path: &str, value: &str) -> bool {
    let rec = srv.records();
    let r = rec
        .iter()
        .find(|r| r.starts_with(format!("POST {path} ").as_bytes()))
        .unwrap_or_else(|| panic!("nothing arrived at {path}"));
    let real = count(r, value.as_bytes());
    let placeholders = placeholders_in(r, value.len()).len();
    assert_eq!(
        real + placeholders,
        2,
        "neither value nor placeholder at {path}: {}",
        String::from_utf8_lossy(r)
    );
    real == 2
}

fn curl(srv: &TlsServer, env: &str, host: &str, path: &str, extra: &str) -> String {
    format!(
        "curl -sS --cacert {ca} {extra} -H \"Authorization: Bearer ${env}\" -d \"token=${env}\" https://{host}:{port}{path}",
        ca = srv.cacert().display(),
        port = srv.port,
    )
}

#[test]
fn curl_sends_the_value_only_to_the_dns_verified_host() {
    let Some(_g) = root_test() else { return };
    let _dns = zone(60);
    let srv = TlsServer::start_on(ADDRS);
    let f = Fixture::new(&[("A", "    hosts: [allowed.test]\n")]);
    let resolve = format!("--resolve allowed.test:{}:127.0.0.2", srv.port);
    let script = [
        curl(&srv, "A", "allowed.test", "/allowed", ""),
        curl(&srv, "A", "other.test", "/other", ""),
        curl(&srv, "A", "127.0.0.2", "/direct-ip", ""),
        curl(&srv, "A", "allowed.test", "/curl-resolve", &resolve),
    ]
    .join(" && ");
    let run = run_kloak_resolving_via(RESOLVER, &f.secrets, &[], &["sh", "-c", &script], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let v = f.value("A");
    assert!(
        arrived_real(&srv, "/allowed", v),
        "allowed.test resolved by DNS must get the value"
    );
    assert!(
        !arrived_real(&srv, "/other", v),
        "other.test must get the placeholder"
    );
    assert!(
        !arrived_real(&srv, "/direct-ip", v),
        "an address no DNS answer named must get the placeholder"
    );
    assert!(
        !arrived_real(&srv, "/curl-resolve", v),
        "curl --resolve bypasses DNS: placeholder"
    );
    assert!(
        run.stats["agent"]["blocked"].as_u64() >= Some(3),
        "{}",
        run.stats
    );
    assert!(run.stderr().contains("blocked"), "blocks are logged");
    run.assert_no_leak(v);
}

#[test]
fn python_and_go_clients_are_filtered_the_same_way() {
    let Some(_g) = root_test() else { return };
    let _dns = zone(60);
    let go = go_client();
    let srv = TlsServer::start_on(ADDRS);
    let f = Fixture::new(&[("API_TOKEN", "    hosts: [allowed.test]\n")]);
    let ca = srv.cacert().display().to_string();
    let py = |host: &str, ip: &str| {
        format!(
            "python3 {} request --port {} --cacert {ca} --host {host} {ip}",
            py_client(),
            srv.port,
            ip = if ip.is_empty() {
                String::new()
            } else {
                format!("--ip {ip}")
            }
        )
    };
    let script = [
        py("allowed.test", ""),
        py("other.test", ""),
        py("allowed.test", "127.0.0.2"),
        format!(
            "{} -url https://allowed.test:{}/go-allowed -cacert {ca}",
            go.display(),
            srv.port
        ),
        format!(
            "{} -url https://other.test:{}/go-other -cacert {ca}",
            go.display(),
            srv.port
        ),
    ]
    .join(" && ");
    let run = run_kloak_resolving_via(RESOLVER, &f.secrets, &[], &["sh", "-c", &script], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let v = f.value("API_TOKEN");
    let rec = srv.records();
    assert_eq!(rec.len(), 5, "every request arrived");
    // Python requests all go to /request, in order: allowed, other, direct IP.
    let py_recs: Vec<&Vec<u8>> = rec
        .iter()
        .filter(|r| r.starts_with(b"POST /request "))
        .collect();
    assert_eq!(py_recs.len(), 3);
    let real = |r: &Vec<u8>| count(r, v.as_bytes()) == 2;
    assert!(real(py_recs[0]), "Python to allowed.test: value");
    assert!(
        !real(py_recs[1]) && placeholders_in(py_recs[1], v.len()).len() == 2,
        "Python to other.test: placeholder"
    );
    assert!(
        !real(py_recs[2]) && placeholders_in(py_recs[2], v.len()).len() == 2,
        "Python to the bare address: placeholder"
    );
    assert!(
        arrived_real(&srv, "/go-allowed", v),
        "Go to allowed.test: value"
    );
    assert!(
        !arrived_real(&srv, "/go-other", v),
        "Go to other.test: placeholder"
    );
    run.assert_no_leak(v);
}

#[test]
fn wildcards_cidrs_and_ports() {
    let Some(_g) = root_test() else { return };
    let _dns = zone(60);
    let srv = TlsServer::start_on(ADDRS);
    let port = srv.port;
    let f = Fixture::new(&[
        ("W", "    hosts: [\"*.svc.test\"]\n"),
        ("C", "    hosts: [127.0.0.0/30]\n"),
        ("P", "    hosts: [allowed.test]\n    port: 1\n"),
        (
            "Q",
            &format!("    hosts: [allowed.test]\n    port: [1, {port}]\n"),
        ),
    ]);
    let script = [
        curl(&srv, "W", "api.svc.test", "/wild-api", ""),
        curl(&srv, "W", "allowed.test", "/wild-allowed", ""),
        curl(&srv, "C", "127.0.0.2", "/cidr-in", ""),
        curl(&srv, "C", "127.0.0.4", "/cidr-out", ""),
        curl(&srv, "P", "allowed.test", "/port-wrong", ""),
        curl(&srv, "Q", "allowed.test", "/port-listed", ""),
    ]
    .join(" && ");
    let run = run_kloak_resolving_via(RESOLVER, &f.secrets, &[], &["sh", "-c", &script], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert!(
        arrived_real(&srv, "/wild-api", f.value("W")),
        "*.svc.test matches api.svc.test"
    );
    assert!(!arrived_real(&srv, "/wild-allowed", f.value("W")));
    assert!(
        arrived_real(&srv, "/cidr-in", f.value("C")),
        "a CIDR matches a literal address"
    );
    assert!(!arrived_real(&srv, "/cidr-out", f.value("C")));
    assert!(
        !arrived_real(&srv, "/port-wrong", f.value("P")),
        "a port rule rejects another port"
    );
    assert!(arrived_real(&srv, "/port-listed", f.value("Q")));
    for (_, v) in &f.values {
        run.assert_no_leak(v);
    }
}

#[test]
fn an_expired_answer_verifies_no_new_connection_but_keeps_established_ones() {
    let Some(_g) = root_test() else { return };
    let _dns = zone(2);
    let srv = TlsServer::start_on(ADDRS);
    let f = Fixture::new(&[("API_TOKEN", "    hosts: [allowed.test]\n")]);
    let cmd = format!(
        "python3 {} ttl --port {} --cacert {} --host allowed.test --wait 3.5",
        py_client(),
        srv.port,
        srv.cacert().display()
    );
    let run = run_kloak_resolving_via(RESOLVER, &f.secrets, &[], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let v = f.value("API_TOKEN");
    assert!(arrived_real(&srv, "/ttl/1-fresh", v));
    assert!(
        arrived_real(&srv, "/ttl/2-established", v),
        "an established connection keeps its verification"
    );
    assert!(
        !arrived_real(&srv, "/ttl/3-new-connection-expired", v),
        "the answer expired: a new connection is unverified"
    );
    assert!(
        arrived_real(&srv, "/ttl/4-resolved-again", v),
        "resolving again verifies again"
    );
    run.assert_no_leak(v);
}

#[test]
fn a_forged_answer_from_an_untrusted_server_authorises_nothing() {
    let Some(_g) = root_test() else { return };
    let _dns = zone(60);
    let _forger = DnsServer::start(FORGER, &[("evil.test", "127.0.0.3", 60)]);
    let srv = TlsServer::start_on(ADDRS);
    let f = Fixture::new(&[("API_TOKEN", "    hosts: [evil.test]\n")]);
    let cmd = format!(
        "python3 {} forged --port {} --cacert {} --host evil.test --dns {FORGER}",
        py_client(),
        srv.port,
        srv.cacert().display()
    );
    let run = run_kloak_resolving_via(RESOLVER, &f.secrets, &[], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert!(
        run.stdout().contains("ip=127.0.0.3"),
        "the forged answer was used: {}",
        run.stdout()
    );
    assert!(!arrived_real(&srv, "/forged", f.value("API_TOKEN")));
    assert!(
        run.stats["agent"]["dns_untrusted"].as_u64() >= Some(1),
        "{}",
        run.stats
    );
}

#[test]
fn openssl_s_client_with_a_socket_bio_is_filtered_too() {
    let Some(_g) = root_test() else { return };
    let _dns = zone(60);
    let srv = TlsServer::start_on(ADDRS);
    let f = Fixture::new(&[("A", "    hosts: [allowed.test]\n")]);
    // s_client binds its SSL* with BIO_new_socket + SSL_set_bio.
    let s_client = |host: &str, path: &str| {
        format!(
            "printf 'POST {path} HTTP/1.1\\r\\nHost: {host}\\r\\nAuthorization: Bearer %s\\r\\nContent-Length: %d\\r\\n\\r\\ntoken=%s' \"$A\" $((6+${{#A}})) \"$A\" \
             | openssl s_client -quiet -no_ign_eof -connect {host}:{port} -servername {host} -CAfile {ca} >/dev/null 2>&1",
            port = srv.port,
            ca = srv.cacert().display()
        )
    };
    let script = format!(
        "{} ; {} ; sleep 0.3",
        s_client("allowed.test", "/sc-allowed"),
        s_client("other.test", "/sc-other")
    );
    // Pause: s_client's first SSL_write runs the handshake itself, so at
    // its entry no key exists yet and the wire cannot serve it; under the
    // wire a secret with rules then goes out as the placeholder.
    let run = run_kloak_resolving_via(
        RESOLVER,
        &f.secrets,
        &["--mode", "pause"],
        &["sh", "-c", &script],
        T,
    );
    assert!(run.output.status.success(), "{}", run.stderr());
    srv.wait_for(2, Duration::from_secs(5));
    assert!(
        arrived_real(&srv, "/sc-allowed", f.value("A")),
        "s_client to allowed.test: value: {}\n{}",
        run.stats,
        run.stderr()
    );
    assert!(
        !arrived_real(&srv, "/sc-other", f.value("A")),
        "s_client to other.test: placeholder"
    );
    run.assert_no_leak(f.value("A"));
}

#[test]
fn ipv6_destinations_are_verified_by_aaaa_answers() {
    let Some(_g) = root_test() else { return };
    let _dns = DnsServer::start(RESOLVER, &[("v6.test", "::1", 60)]);
    let srv = TlsServer::start_on(&["127.0.0.1", "::1"]);
    let f = Fixture::new(&[
        ("A", "    hosts: [v6.test]\n"),
        ("N", "    hosts: [\"::1/128\"]\n"),
    ]);
    let script = [
        curl(&srv, "A", "v6.test", "/v6-name", "-6"),
        curl(&srv, "A", "[::1]", "/v6-bare", ""),
        curl(&srv, "N", "[::1]", "/v6-cidr", ""),
    ]
    .join(" && ");
    let run = run_kloak_resolving_via(RESOLVER, &f.secrets, &[], &["sh", "-c", &script], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert!(
        arrived_real(&srv, "/v6-name", f.value("A")),
        "an AAAA answer verifies ::1 for v6.test"
    );
    assert!(
        !arrived_real(&srv, "/v6-bare", f.value("A")),
        "bare [::1]: placeholder"
    );
    assert!(
        arrived_real(&srv, "/v6-cidr", f.value("N")),
        "an IPv6 CIDR matches"
    );
}
