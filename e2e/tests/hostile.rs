//! A hostile application under `kloak run --mode wire`: an OpenSSL 3 client
//! (`fixtures/hostile_client.c`), run as `nobody`, that tries to see the
//! real value or to have it sent where the secret's rules forbid. The
//! secret may only go to `allowed.test` (127.0.0.2), named by dnsmasq, the
//! trusted resolver; `other.test` (127.0.0.3) is the server it must never
//! reach. Every test asserts on what the two recording servers decrypted,
//! on what the client saw (its reader thread, its BIO, its whole memory
//! before it exits) and on what Kloak printed. Root only.
//!
//! Some attacks make the write one the wire cannot patch (no cipher suite
//! known for the socket the `SSL*` names, or a CBC suite), so `pause`
//! serves it, with its destination check on state the application
//! controls. Each such test has a twin with `requireWire: true`, the
//! secret setting that forbids that fallback.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use kloak_e2e::*;

const T: Duration = Duration::from_secs(120);
/// Not the resolver address other suites use: they may run at the same time.
const RESOLVER: &str = "127.0.0.163";
const ALLOWED_IP: &str = "127.0.0.2";
const EVIL_IP: &str = "127.0.0.3";

fn client() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = workspace_root().join("target/e2e-bin");
        std::fs::create_dir_all(&out).unwrap();
        let bin = out.join("hostile_client");
        let st = Command::new("cc")
            .arg("-O1")
            .arg(fixtures().join("hostile_client.c"))
            .arg("-o")
            .arg(&bin)
            .args(["-lssl", "-lcrypto", "-lpthread"])
            .status()
            .expect("cc runs");
        assert!(
            st.success(),
            "building the hostile client failed (libssl-dev installed?)"
        );
        bin
    })
    .clone()
}

#[derive(Clone, Copy, PartialEq)]
enum Suite {
    /// The default: TLS 1.3, AES-GCM, a write the wire patches.
    Aead,
    /// TLS 1.2 ECDHE-ECDSA-AES128-SHA256: only `pause` could serve it.
    Cbc,
}

struct Case {
    mode: &'static str,
    writes: u32,
    suite: Suite,
    /// `requireWire: true` on the secret.
    require_wire: bool,
    /// A reader thread watches the request buffer.
    spin: bool,
}

impl Case {
    fn new(mode: &'static str) -> Case {
        Case {
            mode,
            writes: 1,
            suite: Suite::Aead,
            require_wire: false,
            spin: true,
        }
    }
    fn writes(mut self, n: u32) -> Case {
        self.writes = n;
        self
    }
    fn cbc(mut self) -> Case {
        self.suite = Suite::Cbc;
        self
    }
    fn no_reader(mut self) -> Case {
        self.spin = false;
        self
    }
    fn require_wire(mut self) -> Case {
        self.require_wire = true;
        self
    }
}

/// What happened, from every side the test can look at.
struct Outcome {
    value: String,
    ok: bool,
    result: HashMap<String, String>,
    memory: Vec<u8>,
    observed: Vec<u8>,
    bio: Vec<u8>,
    allowed: Vec<Vec<u8>>,
    evil: Vec<Vec<u8>>,
    kloak_out: Vec<u8>,
    stats: serde_json::Value,
}

impl Outcome {
    fn field(&self, k: &str) -> u64 {
        self.result
            .get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in the client's RESULT line: {:?}", self.result))
    }

    /// The counters that are not zero, for failure messages.
    fn counters(&self) -> String {
        let mut out = Vec::new();
        for side in ["bpf", "agent"] {
            if let Some(m) = self.stats[side].as_object() {
                for (k, v) in m {
                    if v.as_u64().is_some_and(|n| n > 0) && !k.ends_with("_ns_total") {
                        out.push(format!("{side}.{k}={v}"));
                    }
                }
            }
        }
        out.join(" ")
    }

    fn placeholders(&self, rec: &[u8]) -> usize {
        placeholders_in(rec, self.value.len()).len()
    }

    /// Every way the value reached the application or the other server.
    fn leaks(&self) -> Vec<String> {
        let v = self.value.as_bytes();
        let mut out = Vec::new();
        let mut check = |what: &str, n: usize| {
            if n > 0 {
                out.push(format!("{what}: {n}"));
            }
        };
        check(
            "copies of the value at the non-allowed server",
            self.evil.iter().map(|r| count(r, v)).sum(),
        );
        check(
            "copies of the value in the client's memory",
            count(&self.memory, v),
        );
        check(
            "copies of the value the reader thread or the BIO saw in the request buffer",
            count(&self.observed, v),
        );
        check(
            "copies of the value in what the BIO was given",
            count(&self.bio, v),
        );
        check(
            "copies of the value in Kloak's or the client's output",
            count(&self.kloak_out, v),
        );
        check(
            "copies of the value in the stats",
            count(self.stats.to_string().as_bytes(), v),
        );
        for k in ["spin_changed", "after_changed", "bio_changed"] {
            check(
                &format!("{k} (the request buffer changed under the application)"),
                self.field(k) as usize,
            );
        }
        out
    }

    fn assert_no_leak(&self) {
        let leaks = self.leaks();
        assert!(
            leaks.is_empty(),
            "mode {}: the value leaked: {leaks:#?}\nclient: {:?}\ncounters: {}\nKloak said:\n{}",
            self.result.get("mode").map_or("?", |s| s.as_str()),
            self.result,
            self.counters(),
            String::from_utf8_lossy(&self.kloak_out)
        );
    }

    /// The request reached the non-allowed server, carrying the placeholder:
    /// the attack ran through, and was refused.
    fn assert_evil_got_only_placeholders(&self, requests: usize) {
        assert_eq!(
            self.evil.len(),
            requests,
            "requests at the non-allowed server"
        );
        for r in &self.evil {
            assert_eq!(
                self.placeholders(r),
                2,
                "the non-allowed server should see the placeholder in header and body: {}",
                String::from_utf8_lossy(r)
            );
        }
    }
}

fn run_case(case: &Case) -> Outcome {
    let bin = client();
    let _dns = DnsServer::start(
        RESOLVER,
        &[
            ("allowed.test", ALLOWED_IP, 300),
            ("other.test", EVIL_IP, 300),
        ],
    );
    let allowed = TlsServer::start_on(&[ALLOWED_IP]);
    let evil = TlsServer::start_on(&[EVIL_IP]);
    let value = random_secret("sk-hostile-", 36);
    let strict = if case.require_wire {
        "    requireWire: true\n"
    } else {
        ""
    };
    let secrets = Secrets::raw(&format!(
        "secrets:\n  - name: api-token\n    value: \"{value}\"\n    env: API_TOKEN\n    hosts: [allowed.test]\n{strict}"
    ));

    // The client runs as nobody: its CA file and its output directory must
    // be open to it.
    let out = tempfile::tempdir().unwrap();
    std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // Both servers' CAs: the client must complete its handshake with the
    // other server too, or no attack would reach it.
    let ca = out.path().join("ca.pem");
    let mut pem = std::fs::read(allowed.cacert()).unwrap();
    pem.extend(std::fs::read(evil.cacert()).unwrap());
    std::fs::write(&ca, pem).unwrap();
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();

    let cbc = if case.suite == Suite::Cbc { "1" } else { "0" };
    let (aport, eport, writes) = (
        allowed.port.to_string(),
        evil.port.to_string(),
        case.writes.to_string(),
    );
    let argv = as_nobody(&[
        "env",
        "HOSTILE_WAIT=1",
        &format!("HOSTILE_CBC={cbc}"),
        if case.spin {
            "HOSTILE_SPIN=1"
        } else {
            "HOSTILE_SPIN=0"
        },
        bin.to_str().unwrap(),
        case.mode,
        ca.to_str().unwrap(),
        out.path().to_str().unwrap(),
        "allowed.test",
        &aport,
        "other.test",
        &eport,
        &writes,
    ]);
    let (mut c, stats_path) =
        kloak_cmd_resolving_via(RESOLVER, &secrets, &["--mode", "wire"], &strs(&argv));
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kloak run starts");
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<Option<String>>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            all.push_str(&l);
            all.push('\n');
            let _ = tx.send(Some(l));
        }
        let _ = tx.send(None);
        all
    });
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let kill = || {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    };

    // The client's memory, read while it waits to exit.
    let mut memory = Vec::new();
    loop {
        match rx.recv_timeout(T) {
            Ok(Some(l)) => {
                if let Some(p) = l.strip_prefix("READY pid=") {
                    memory = memory_of(p.parse().unwrap());
                    assert!(
                        memory.len() > 1 << 20,
                        "read too little of the client's memory"
                    );
                    let _ = child.stdin.as_mut().unwrap().write_all(b"\n");
                    break;
                }
            }
            Ok(None) => break,
            Err(_) => {
                kill();
                panic!("{}: the client did not finish within {T:?}", case.mode);
            }
        }
    }
    let status = child.wait().unwrap();
    let stdout = reader.join().unwrap();
    let mut kloak_out = err_reader.join().unwrap();
    kloak_out.extend_from_slice(stdout.as_bytes());
    let result: HashMap<String, String> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "{}: no RESULT from the client (exit {status}):\n{}",
                case.mode,
                String::from_utf8_lossy(&kloak_out)
            )
        })
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(
        !memory.is_empty(),
        "{}: the client never said READY",
        case.mode
    );
    let cipher = &result["cipher"];
    match case.suite {
        Suite::Aead => assert!(cipher.contains("GCM"), "{}: {cipher}", case.mode),
        Suite::Cbc => assert!(cipher.contains("SHA256") && !cipher.contains("GCM")),
    }
    let stats = std::fs::read(&stats_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    // The servers record a request once they have read it whole; the
    // client has read their answers, so everything is there.
    Outcome {
        ok: status.success(),
        result,
        memory,
        observed: std::fs::read(out.path().join("observed.bin")).unwrap_or_default(),
        bio: std::fs::read(out.path().join("bio.bin")).unwrap_or_default(),
        allowed: allowed.records(),
        evil: evil.records(),
        kloak_out,
        stats,
        value,
    }
}

/// Every request at the allowed server carried the real value in its
/// header and its body.
fn assert_allowed_got_real(o: &Outcome, requests: usize, per_request: usize) {
    assert_eq!(o.allowed.len(), requests, "requests at the allowed server");
    for (i, r) in o.allowed.iter().enumerate() {
        assert_eq!(
            count(r, o.value.as_bytes()),
            per_request,
            "request {i} at the allowed server ({}): {}",
            o.counters(),
            String::from_utf8_lossy(r)
        );
    }
}

/// 1. A second thread reading the `SSL_write` buffer during 1,000 writes
///    never sees it change; the allowed server gets the value every time.
#[test]
fn a_reader_thread_never_sees_the_value_in_1000_writes() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("spin").writes(1000));
    assert!(o.ok);
    assert!(
        o.field("spin_reads") > 1000,
        "the reader thread hardly ran: {:?}",
        o.result
    );
    o.assert_no_leak();
    assert_allowed_got_real(&o, 1000, 2);
    assert!(o.evil.is_empty());
}

/// 2. The records pass through the application's own BIO (`BIO_meth_new`),
///    which forwards them to the other server: it is given ciphertext
///    only, the plaintext it could look at meanwhile never changes, and the
///    other server decrypts the placeholder.
#[test]
fn a_custom_bio_sees_no_value_and_forwards_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("bio"));
    assert!(o.ok);
    assert!(!o.bio.is_empty(), "the BIO was never called");
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

/// 2b. The same BIO, whose first call makes an empty write(2) on a socket
///     connected to the allowed host before forwarding the handshake
///     elsewhere: the agent learns the `SSL*`'s socket from a handshake's
///     first socket write.
#[test]
fn a_custom_bio_that_plants_an_allowed_socket_forwards_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("bio-plant"));
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

#[test]
fn a_custom_bio_that_plants_an_allowed_socket_gets_no_require_wire_value() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("bio-plant").require_wire());
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

/// 3. One write holding 13 placeholders (more than the kernel's 8 per
///    write): after each call returns the buffer holds no value, nor does
///    the client's memory at the end; the allowed server gets each as the
///    value or as the placeholder. No reader thread here: what it copies
///    while the write runs is 3b's subject.
#[test]
fn more_than_eight_placeholders_leave_no_value_once_the_write_returned() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("many").writes(20).no_reader());
    assert!(o.ok);
    let v = o.value.as_bytes();
    assert_eq!(o.field("after_changed"), 0, "{}", o.counters());
    assert_eq!(
        count(&o.memory, v),
        0,
        "the value is in the client's memory"
    );
    assert_eq!(count(&o.kloak_out, v), 0);
    assert!(o.evil.is_empty());
    assert_eq!(o.allowed.len(), 20);
    for r in &o.allowed {
        assert_eq!(
            count(r, v) + o.placeholders(r),
            13,
            "{}",
            String::from_utf8_lossy(r)
        );
    }
}

/// 3b. The same, watched during the call as well.
#[test]
fn more_than_eight_placeholders_never_put_a_value_in_memory() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("many").writes(20));
    assert!(o.ok);
    o.assert_no_leak();
}

#[test]
fn more_than_eight_require_wire_placeholders_never_put_a_value_in_memory() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("many").writes(20).require_wire());
    assert!(o.ok);
    o.assert_no_leak();
    assert_eq!(o.allowed.len(), 20);
}

/// 4. `SSL_set_fd` on a socket to the allowed host, then `SSL_set_wfd` (and
///    `SSL_set_rfd`) on one to the other server, before the handshake.
#[test]
fn ssl_set_wfd_after_ssl_set_fd_sends_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("wfd"));
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

#[test]
fn ssl_set_wfd_after_ssl_set_fd_sends_no_require_wire_value() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("wfd").require_wire());
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

/// 5. `dup2` puts a socket to the other server over the descriptor that
///    connect(2) verified (no close(2) is seen), then `SSL_set_fd` on it.
#[test]
fn dup2_over_the_verified_fd_sends_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("dup2"));
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

/// 5b. The same with a CBC suite, which only `pause` can serve.
#[test]
fn dup2_over_the_verified_fd_with_a_cbc_suite_sends_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("dup2").cbc());
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

/// 6. An `SSL*` named the allowed socket (`SSL_set_fd`) and was freed; a
///    new `SSL*` at the same address writes through a BIO of the
///    application's to the other server.
#[test]
fn a_reused_ssl_address_sends_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("reuse"));
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

#[test]
fn a_reused_ssl_address_sends_no_require_wire_value() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("reuse").require_wire());
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

/// 7. After its requests, the whole memory of the client (read through
///    /proc/PID/mem while it waits to exit) holds no copy of the value:
///    with an AEAD suite (the wire's), and with a CBC suite forced by the
///    application.
#[test]
fn after_its_requests_the_clients_memory_holds_no_copy() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("spin").writes(100));
    assert!(o.ok);
    o.assert_no_leak();
    assert_allowed_got_real(&o, 100, 2);
}

#[test]
fn with_a_cbc_suite_forced_the_value_never_enters_the_client() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("spin").writes(100).cbc());
    assert!(o.ok);
    o.assert_no_leak();
}

#[test]
fn with_a_cbc_suite_forced_a_require_wire_value_never_enters_the_client() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("spin").writes(100).cbc().require_wire());
    assert!(o.ok);
    o.assert_no_leak();
    // Only the wire may serve it, and it cannot here: the placeholder.
    assert_eq!(o.allowed.len(), 100);
    for r in &o.allowed {
        assert_eq!(o.placeholders(r), 2);
    }
}

/// close_range(2) closes the verified descriptor without close(2)'s
/// tracepoint; a socket another process connected to the other server
/// arrives over a unix socket (SCM_RIGHTS) at the same number.
#[test]
fn close_range_and_a_passed_socket_send_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("close-range"));
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

#[test]
fn close_range_and_a_passed_socket_with_a_cbc_suite_send_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("close-range").cbc());
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

/// A socket another process connected, received over SCM_RIGHTS: this
/// process never connected it.
#[test]
fn a_socket_passed_by_another_process_gets_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("scm"));
    assert!(o.ok);
    o.assert_no_leak();
    o.assert_evil_got_only_placeholders(1);
}

/// exec closes the verified (close-on-exec) socket without close(2); the
/// new image moves a socket to the other server to its number (F_DUPFD).
#[test]
fn exec_then_f_dupfd_over_the_verified_number_sends_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    for case in [Case::new("exec"), Case::new("exec").cbc()] {
        let o = run_case(&case);
        assert!(o.ok);
        o.assert_no_leak();
        o.assert_evil_got_only_placeholders(1);
    }
}

/// The honest socket, but the records leave through io_uring
/// (IORING_OP_SEND), which no write(2)/send(2) tracepoint sees: the wire
/// cannot place the value in them, so the placeholder arrives; the value
/// is never in the client.
#[test]
fn records_sent_through_io_uring_carry_no_value_out_of_place() {
    let Some(_g) = root_test() else { return };
    let o = run_case(&Case::new("uring").writes(5));
    assert!(o.ok);
    o.assert_no_leak();
    assert_eq!(o.allowed.len(), 5);
    for r in &o.allowed {
        assert_eq!(
            count(r, o.value.as_bytes()) + o.placeholders(r),
            2,
            "{}",
            String::from_utf8_lossy(r)
        );
    }
    assert!(o.evil.is_empty());
}
