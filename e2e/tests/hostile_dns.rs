//! A hostile application cannot make a name verify an address of its
//! choosing: Kloak learns DNS answers from the packets the kernel received,
//! matched to a query the same socket sent (bpf/src/bpf/dns.h), never from
//! the application's memory. The application runs as an unprivileged user
//! under `kloak run`, with a secret limited to `hosts: [allowed.test]`;
//! dnsmasq is the system's trusted resolver, and a second trusted resolver
//! (e2e/fixtures/fake_dns.py) misbehaves on request. Root only.

use std::process::{Child, Command};
use std::time::Duration;

use kloak_e2e::*;

const T: Duration = Duration::from_secs(120);
/// Addresses of their own: other tests and sessions use 127.0.0.15x.
const DNSMASQ: &str = "127.0.0.173";
const FAKE: &str = "127.0.0.174";
const FAKE_OTHER: &str = "127.0.0.175";
/// Every address a scenario sends its placeholder to (see hostile_dns.py).
const ADDRS: &[&str] = &[
    "127.0.0.2",
    "127.0.0.3",
    "127.0.0.4",
    "127.0.0.5",
    "127.0.0.6",
    "127.0.0.7",
    "127.0.0.8",
    "127.0.0.9",
    "127.0.0.10",
    "127.0.0.11",
    "127.0.0.12",
    "127.0.0.13",
];
/// Scenarios whose answer is real and trusted: the value must arrive.
const HONEST: &[&str] = &["control", "fake-control", "fake6-control"];
/// Scenarios of the attacker: only the placeholder may arrive.
const ATTACKS: &[&str] = &[
    "addrlen0",
    "rewrite",
    "selfsend",
    "wrongid",
    "wrongaddr",
    "othersock",
    "duplicate",
    "wrongport",
    "netns",
];

/// fake_dns.py, killed on drop.
struct FakeResolver(Child);

impl FakeResolver {
    fn start() -> FakeResolver {
        let mut c = Command::new("python3");
        c.arg(fixtures().join("fake_dns.py"))
            .args(["--addr", FAKE, "--other-addr", FAKE_OTHER]);
        FakeResolver(spawn_listening(&mut c, "the fake resolver").0)
    }
}

impl Drop for FakeResolver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the request to `/hostile/<scenario>` carried the real value
/// (true) or only its placeholder (false).
fn arrived_real(srv: &TlsServer, scenario: &str, value: &str) -> bool {
    let rec = srv.records();
    let r = rec
        .iter()
        .find(|r| r.starts_with(format!("POST /hostile/{scenario} ").as_bytes()))
        .unwrap_or_else(|| panic!("nothing arrived for {scenario}"));
    let real = count(r, value.as_bytes());
    let placeholders = placeholders_in(r, value.len()).len();
    assert_eq!(
        real + placeholders,
        2,
        "neither value nor placeholder for {scenario}: {}",
        String::from_utf8_lossy(r)
    );
    real == 2
}

fn hostile(mode: &[&str]) {
    let _dns = DnsServer::start(DNSMASQ, &[("allowed.test", "127.0.0.2", 60)]);
    let _fake = FakeResolver::start();
    let srv = TlsServer::start_on(ADDRS);
    let value = random_secret("hostile-", 32);
    let secrets = Secrets::raw(&format!(
        "secrets:\n  - name: api\n    value: \"{value}\"\n    env: API_TOKEN\n    hosts: [allowed.test]\n"
    ));
    let mut extra = mode.to_vec();
    for r in [DNSMASQ, FAKE, "::1"] {
        extra.extend(["--trusted-dns", r]);
    }
    let port = srv.port.to_string();
    let script = fixtures().join("hostile_dns.py").display().to_string();
    let app = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        // The system's: an unprivileged user cannot reach root's pyenv.
        "/usr/bin/python3",
        &script,
        "--port",
        &port,
        "--dns",
        DNSMASQ,
        "--fake",
        FAKE,
    ];
    let run = run_kloak_resolving_via(DNSMASQ, &secrets, &extra, &app, T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let out = run.stdout();
    for s in HONEST.iter().chain(ATTACKS) {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{s}=ok"))),
            "scenario {s} did not run to its request:\n{out}\n{}",
            run.stderr()
        );
    }
    for s in HONEST {
        assert!(
            arrived_real(&srv, s, &value),
            "{s}: a trusted answer to the process's own query verifies allowed.test\n{}",
            run.stderr()
        );
    }
    let leaked: Vec<&str> = ATTACKS
        .iter()
        .copied()
        .filter(|s| arrived_real(&srv, s, &value))
        .collect();
    assert!(
        leaked.is_empty(),
        "the attacker's address for allowed.test got the value in {leaked:?}"
    );
    assert!(
        run.stderr().contains("packets: cgroup_skb"),
        "the packet path is the DNS source: {}",
        run.stderr()
    );
    let bpf = &run.stats["bpf"];
    assert!(bpf["dns_answers"].as_u64() >= Some(3), "{}", run.stats);
    assert!(
        bpf["dns_foreign"].as_u64() >= Some(1),
        "the query from the attacker's own namespace is not kept: {}",
        run.stats
    );
    assert!(
        bpf["dns_mismatched"].as_u64() >= Some(1),
        "the answer from another address is refused: {}",
        run.stats
    );
    run.assert_no_leak(&value);
}

#[test]
fn hostile_dns_answers_verify_nothing_default_mode() {
    let Some(_g) = root_test() else { return };
    hostile(&[]);
}

#[test]
fn hostile_dns_answers_verify_nothing_wire() {
    let Some(_g) = root_test() else { return };
    hostile(&["--mode", "wire"]);
}

#[test]
fn hostile_dns_answers_verify_nothing_pause() {
    let Some(_g) = root_test() else { return };
    hostile(&["--mode", "pause"]);
}
