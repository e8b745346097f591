//! End-to-end harness: the `kloak` binary, a recording TLS server, real TLS
//! clients. Tests assert on the bytes the server received.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

pub mod cluster;
pub mod k8s;
pub mod ledger;
pub mod otel;
pub mod poll;

/// Root-only tests skip outside CI and fail inside it: a skipped data-path
/// test in CI would be a test that cannot fail.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("end-to-end tests load BPF programs and must run as root under CI");
    }
    eprintln!("skipped: needs root");
    false
}

/// Data-path tests share two cores; running them one at a time keeps
/// concurrency tests meaningful and timings sane.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Start of a root-only test: None (skip) without root outside CI, otherwise
/// the serial lock, held for the test's length.
pub fn root_test() -> Option<MutexGuard<'static, ()>> {
    require_root().then(serial)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e sits in the workspace")
        .to_path_buf()
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The kloak binary under test: $KLOAK_BIN, or the workspace's debug build.
pub fn kloak_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KLOAK_BIN") {
        return PathBuf::from(p);
    }
    let p = workspace_root().join("target/debug/kloak");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p kloak` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A random printable secret of `len` bytes, different on every run, so a
/// leak check cannot pass by accident.
pub fn random_secret(prefix: &str, len: usize) -> String {
    let mut s = prefix.to_string();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ (std::process::id() as u64) << 32;
    while s.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let c = b"abcdefghijklmnopqrstuvwxyz0123456789"[(seed % 36) as usize];
        s.push(c as char);
    }
    s.truncate(len);
    ledger::remember_value(&s);
    s
}

/// A random secret of `len` bytes whose characters all have 6-bit HPACK
/// Huffman codes. Short values must have a code length a placeholder can
/// match (Kloak refuses the others); mixed random characters often do not.
pub fn hpack_friendly_secret(len: usize) -> String {
    const SIX_BITS: &[u8] = b"3456789bdfghlmnpru";
    let s: String = (0..len)
        .map(|_| SIX_BITS[rand::random_range(0..SIX_BITS.len())] as char)
        .collect();
    ledger::remember_value(&s);
    s
}

pub fn count(hay: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || hay.len() < needle.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Finds `kloak:` placeholders of exactly `len` bytes in `hay`.
pub fn placeholders_in(hay: &[u8], len: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + len <= hay.len() {
        if hay[i..].starts_with(b"kloak:") {
            out.push(String::from_utf8_lossy(&hay[i..i + len]).into_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    out
}

/// A TLS server on 127.0.0.1 that records each request's bytes.
pub struct TlsServer {
    pub port: u16,
    pub dir: TempDir,
    child: Child,
}

/// Names the test certificate covers, for the DNS-verified destination tests.
pub const TEST_NAMES: &[&str] = &[
    "localhost",
    "allowed.test",
    "other.test",
    "api.svc.test",
    "evil.test",
    "v6.test",
];

impl TlsServer {
    pub fn start() -> TlsServer {
        TlsServer::start_on(&["127.0.0.1"])
    }

    /// One port on each of `addrs`, one certificate for all of them and every test name.
    pub fn start_on(addrs: &[&str]) -> TlsServer {
        TlsServer::start_with(addrs, None, &[])
    }

    /// Like [`TlsServer::start_on`], the server's process with `env` set
    /// (`OPENSSL_CONF`: the TLS 1.3 suites a client cannot choose itself).
    pub fn start_with_env(addrs: &[&str], env: &[(&str, &str)]) -> TlsServer {
        TlsServer::start_with(addrs, None, env)
    }

    /// On 127.0.0.1 inside network namespace `ns`.
    pub fn start_in(ns: &Netns) -> TlsServer {
        TlsServer::start_with(&["127.0.0.1"], Some(ns), &[])
    }

    fn start_with(addrs: &[&str], ns: Option<&Netns>, env: &[(&str, &str)]) -> TlsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        make_certificates(dir.path(), addrs);

        // nsenter execs the server itself, so the child is still the server
        // and Drop still kills it.
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(ns.net_arg()).args(["--", "python3"]);
                c
            }
            None => Command::new("python3"),
        };
        c.arg(fixtures().join("tls_server.py"))
            .args([
                "--cert",
                "cert.pem",
                "--key",
                "key.pem",
                "--record",
                "record.jsonl",
            ])
            .args(["--bind", &addrs.join(",")])
            .envs(env.iter().copied())
            .current_dir(dir.path());
        let (child, port) = spawn_listening(&mut c, "the TLS server");
        TlsServer { port, dir, child }
    }

    pub fn cacert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// Every request received so far, in arrival order.
    pub fn records(&self) -> Vec<Vec<u8>> {
        let p = self.dir.path().join("record.jsonl");
        let Ok(text) = std::fs::read_to_string(p) else {
            return Vec::new();
        };
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("record line is JSON");
                b64(v["raw"].as_str().expect("raw"))
            })
            .collect()
    }

    pub fn clear(&self) {
        let _ = std::fs::remove_file(self.dir.path().join("record.jsonl"));
    }

    /// Waits until at least `n` requests have arrived.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let end = Instant::now() + timeout;
        loop {
            let r = self.records();
            if r.len() >= n || Instant::now() > end {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace of its own with its loopback up, deleted on drop:
/// for tests that change how that loopback treats packets.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(stem: &str) -> Netns {
        let name = format!("{stem}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ns = Netns { name };
        ns.run(&["ip", "netns", "add", &ns.name], false);
        ns.run(&["ip", "link", "set", "lo", "up"], true);
        ns
    }

    /// Runs `argv` (inside the namespace when `inside`), panicking on failure.
    pub fn run(&self, argv: &[&str], inside: bool) -> String {
        let mut c = if inside {
            let mut c = Command::new("nsenter");
            c.arg(self.net_arg()).arg("--").args(argv);
            c
        } else {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        };
        let out = c
            .output()
            .unwrap_or_else(|e| panic!("running {argv:?}: {e}"));
        assert!(
            out.status.success(),
            "{argv:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// nsenter's argument for this namespace. Not `ip netns exec`: that
    /// also remounts /sys in a mount namespace of its own, which hides the
    /// cgroup v2 hierarchy the agent tracks processes by.
    fn net_arg(&self) -> String {
        format!("--net=/run/netns/{}", self.name)
    }

    /// `c`, run inside the namespace: same program, arguments, environment
    /// and working directory.
    pub fn wrap(&self, c: &Command) -> Command {
        let mut w = Command::new("nsenter");
        w.arg(self.net_arg())
            .arg("--")
            .arg(c.get_program())
            .args(c.get_args());
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => w.env(k, v),
                None => w.env_remove(k),
            };
        }
        if let Some(d) = c.get_current_dir() {
            w.current_dir(d);
        }
        w
    }

    /// A counter of the namespace's `/proc/net/snmp` (`Tcp`, `RetransSegs`).
    pub fn snmp(&self, proto: &str, field: &str) -> u64 {
        let text = self.run(&["cat", "/proc/net/snmp"], true);
        let mut rows = text.lines().filter(|l| l.starts_with(&format!("{proto}:")));
        let (names, values) = (
            rows.next().expect("snmp header"),
            rows.next().expect("snmp row"),
        );
        let i = names
            .split_whitespace()
            .position(|n| n == field)
            .unwrap_or_else(|| panic!("no {proto} {field} in /proc/net/snmp"));
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A test CA (`ca.pem`) and a server certificate it signed (`cert.pem`,
/// `key.pem`) for every test name and `addrs`. A proper chain: rustls (webpki)
/// refuses a CA certificate used as the server's own.
/// Starts a server that prints `LISTENING <port>` first; returns it and the port.
pub fn spawn_listening(c: &mut Command, what: &str) -> (Child, u16) {
    let mut child = c
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("server prints its port");
    let port = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output from {what}: {line:?}"));
    (child, port)
}

pub fn make_certificates(dir: &Path, addrs: &[&str]) {
    make_certificates_for(dir, &san(addrs));
}

/// A test CA (`ca.pem`, `ca.key`) and a leaf (`cert.pem`, `key.pem`) with
/// this `subjectAltName=...` line, made with the openssl CLI in `dir`.
pub fn make_certificates_for(dir: &Path, subject_alt_name: &str) {
    let ext = dir.join("leaf.ext");
    std::fs::write(
        &ext,
        format!("basicConstraints=critical,CA:FALSE\n{subject_alt_name}\n"),
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=kloak test CA",
                "-days",
                "2",
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    ];
    for args in steps {
        let st = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(st.success(), "openssl {args:?} failed");
    }
}

fn san(addrs: &[&str]) -> String {
    let names = TEST_NAMES.iter().map(|n| format!("DNS:{n}"));
    let ips = std::iter::once("127.0.0.1")
        .chain(addrs.iter().copied())
        .map(|a| format!("IP:{a}"));
    format!(
        "subjectAltName={}",
        names.chain(ips).collect::<Vec<_>>().join(",")
    )
}

/// An HTTP/2 TLS server (hyper-h2) that records decoded requests and the raw
/// plaintext it received.
pub struct H2Server {
    pub port: u16,
    pub dir: TempDir,
    child: Child,
}

impl H2Server {
    pub fn start() -> H2Server {
        let dir = tempfile::tempdir().expect("tempdir");
        make_certificates(dir.path(), &["127.0.0.1"]);
        let mut c = Command::new("python3");
        c.arg(fixtures().join("h2_server.py"))
            .args([
                "--cert",
                "cert.pem",
                "--key",
                "key.pem",
                "--record",
                "record.jsonl",
                "--raw",
                "raw.bin",
            ])
            .current_dir(dir.path());
        let (child, port) = spawn_listening(&mut c, "the h2 server (pip package h2)");
        H2Server { port, dir, child }
    }

    pub fn cacert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("record.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("record line is JSON"))
            .collect()
    }

    pub fn raw(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("raw.bin")).unwrap_or_default()
    }
}

impl Drop for H2Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real DNS server (dnsmasq) on `addr`:53 answering only the given
/// `(name, address, ttl)` records.
pub struct DnsServer {
    pub addr: String,
    child: Child,
}

impl DnsServer {
    pub fn start(addr: &str, records: &[(&str, &str, u32)]) -> DnsServer {
        let mut c = Command::new("dnsmasq");
        c.args([
            "-k",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--pid-file=",
        ])
        .arg(format!("--listen-address={addr}"))
        .arg("--port=53")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        for (name, ip, ttl) in records {
            c.arg(format!("--host-record={name},{ip},{ttl}"));
        }
        let child = c
            .spawn()
            .expect("dnsmasq runs (scripts/install-deps.sh installs dnsmasq-base)");
        // Ready once it answers. The read timeout paces the polls.
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let query = [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'x', 0, 0, 1, 0, 1,
        ];
        poll::eventually_sync(
            &format!("dnsmasq on {addr} to come up"),
            Duration::from_secs(5),
            Duration::ZERO,
            || {
                let _ = sock.send_to(&query, (addr, 53));
                let mut buf = [0u8; 512];
                sock.recv_from(&mut buf).ok()
            },
        );
        DnsServer {
            addr: addr.to_string(),
            child,
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kloak run` in a private mount namespace whose /etc/resolv.conf names
/// only `resolver`: the command resolves through it, and Kloak trusts it.
pub fn run_kloak_resolving_via(
    resolver: &str,
    secrets: &Secrets,
    extra: &[&str],
    command: &[&str],
    timeout: Duration,
) -> Run {
    let (mut c, stats) = kloak_cmd_resolving_via(resolver, secrets, extra, command);
    finish(&mut c, &stats, timeout)
}

/// The command [`run_kloak_resolving_via`] runs, and its stats file: for
/// tests that talk to the command while it runs.
pub fn kloak_cmd_resolving_via(
    resolver: &str,
    secrets: &Secrets,
    extra: &[&str],
    command: &[&str],
) -> (Command, PathBuf) {
    let resolv = secrets.dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {resolver}\noptions attempts:1 timeout:2\n"),
    )
    .unwrap();
    let (inner, stats) = kloak_cmd(secrets, extra, command);
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
    ])
    .arg(&resolv)
    .arg(inner.get_program())
    .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    (c, stats)
}

/// `argv` run as user `nobody` (group `nogroup`, no supplementary groups):
/// the agent stays root, the command holds no privilege at all.
pub fn as_nobody(argv: &[&str]) -> Vec<String> {
    [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "--",
    ]
    .iter()
    .chain(argv)
    .map(|s| s.to_string())
    .collect()
}

fn b64(s: &str) -> Vec<u8> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        if c == b'=' {
            break;
        }
        let v = T.iter().position(|&t| t == c).expect("base64 alphabet") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// A secrets file for `kloak run`.
pub struct Secrets {
    pub dir: TempDir,
    pub path: PathBuf,
}

impl Secrets {
    /// `(name, value, env)` triples.
    pub fn write(entries: &[(&str, &str, &str)]) -> Secrets {
        let mut y = String::from("secrets:\n");
        for (name, value, env) in entries {
            y.push_str(&format!(
                "  - name: {name}\n    value: \"{value}\"\n    env: {env}\n"
            ));
        }
        Secrets::raw(&y)
    }

    pub fn raw(yaml: &str) -> Secrets {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.yaml");
        std::fs::write(&path, yaml).expect("write secrets");
        Secrets { dir, path }
    }
}

/// `kloak run` with stats, debug logging and a timeout.
pub struct Run {
    pub output: Output,
    pub stats: serde_json::Value,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    /// Panics if `secret` shows in anything Kloak or the command printed.
    pub fn assert_no_leak(&self, secret: &str) {
        for (what, bytes) in [
            ("stdout", &self.output.stdout),
            ("stderr", &self.output.stderr),
        ] {
            assert_eq!(
                count(bytes, secret.as_bytes()),
                0,
                "secret value leaked to {what}"
            );
        }
        let stats = self.stats.to_string();
        assert!(!stats.contains(secret), "secret value leaked to the stats");
    }
}

pub fn kloak_cmd(secrets: &Secrets, extra: &[&str], command: &[&str]) -> (Command, PathBuf) {
    let stats = secrets.dir.path().join("stats.json");
    // In a recorded run the agent's stderr is also copied to the run's logs,
    // whatever the test does with it. The shell execs the agent, so the pid
    // a test signals or measures is still the agent's.
    let mut c = match ledger::new_log("kloak-run") {
        Some(log) => {
            let mut c = Command::new("bash");
            c.args(["-c", "exec 2> >(exec tee -a \"$0\" >&2); exec \"$@\""])
                .arg(log)
                .arg(kloak_bin());
            c
        }
        None => Command::new(kloak_bin()),
    };
    c.arg("run")
        .arg("--secrets")
        .arg(&secrets.path)
        .arg("--stats-json")
        .arg(&stats);
    c.args(extra).arg("--").args(command);
    c.env("RUST_LOG", "debug");
    ledger::export_spans(&mut c);
    (c, stats)
}

pub fn run_kloak(secrets: &Secrets, extra: &[&str], command: &[&str], timeout: Duration) -> Run {
    let (mut c, stats) = kloak_cmd(secrets, extra, command);
    finish(&mut c, &stats, timeout)
}

/// `kloak run` inside network namespace `ns`: it attaches its tc programs to
/// that namespace's devices.
pub fn run_kloak_in(
    ns: &Netns,
    secrets: &Secrets,
    extra: &[&str],
    command: &[&str],
    timeout: Duration,
) -> Run {
    let (c, stats) = kloak_cmd(secrets, extra, command);
    finish(&mut ns.wrap(&c), &stats, timeout)
}

/// Runs a prepared `kloak run` and collects its output and stats file.
fn finish(c: &mut Command, stats: &Path, timeout: Duration) -> Run {
    let _ = std::fs::remove_file(stats);
    let output = output_with_timeout(c, timeout);
    let stats = std::fs::read(stats)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    Run { output, stats }
}

/// The Python client in `mode` against `srv`, plus `extra` arguments.
pub fn py_cmd(mode: &str, srv: &TlsServer, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "python3".to_string(),
        py_client(),
        mode.to_string(),
        "--port".to_string(),
        srv.port.to_string(),
        "--cacert".to_string(),
        srv.cacert().display().to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Borrows a command built as owned strings.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub fn output_with_timeout(c: &mut Command, timeout: Duration) -> Output {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let child = c.spawn().expect("command starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("command did not finish within {timeout:?}: {c:?}");
        }
    }
}

/// The Go client, built once per test process with the machine's Go.
pub fn go_client() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = workspace_root().join("target/e2e-bin");
        std::fs::create_dir_all(&out).expect("mkdir");
        let bin = out.join("goclient");
        let st = Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg("main.go")
            .current_dir(fixtures().join("goclient"))
            .env("CGO_ENABLED", "0")
            .status()
            .expect("go is installed");
        assert!(st.success(), "building the Go client failed");
        bin
    })
    .clone()
}

/// The Go client stripped of its symbols (`-ldflags=-s -w`): only
/// `.gopclntab` names its functions.
pub fn stripped_go_client() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = workspace_root().join("target/e2e-bin/goclient-stripped");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        let st = Command::new("go")
            .args(["build", "-ldflags=-s -w", "-o"])
            .arg(&bin)
            .arg("main.go")
            .current_dir(fixtures().join("goclient"))
            .env("CGO_ENABLED", "0")
            .status()
            .expect("go runs");
        assert!(st.success(), "building the stripped Go client failed");
        let nm = Command::new("nm").arg(&bin).output().unwrap();
        assert!(
            String::from_utf8_lossy(&nm.stderr).contains("no symbols"),
            "the Go client must be stripped for this test"
        );
        bin
    })
    .clone()
}

pub fn py_client() -> String {
    fixtures().join("py_client.py").display().to_string()
}

/// State letter of a process, None once it is gone.
pub fn proc_state(pid: u32) -> Option<u8> {
    let s = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = s.iter().rposition(|&c| c == b')')?;
    s.get(close + 2).copied()
}

/// PIDs in a cgroup v2 directory and below.
pub fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for d in rd.flatten() {
            if d.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroup_pids(&d.path()));
            }
        }
    }
    out
}

/// One plain HTTP/1.0 GET; the status code and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "")
}

/// Like [`http_get`], but None instead of a panic: for drop paths, where
/// the server may already be gone.
pub fn try_http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    try_http_request(addr, "GET", path, "").ok()
}

/// One plain HTTP/1.0 request with a body; the status code and the body.
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    try_http_request(addr, method, path, body).unwrap_or_else(|e| panic!("{e}"))
}

fn try_http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("writing to {addr}: {e}"))?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response from {addr}{path}: {head:?}"))?;
    Ok((code, body.to_string()))
}

/// `kloak run` with extra environment (e.g. the OTLP variables).
pub fn run_kloak_with_env(
    secrets: &Secrets,
    extra: &[&str],
    env: &[(&str, &str)],
    command: &[&str],
    timeout: Duration,
) -> Run {
    let (mut c, stats) = kloak_cmd(secrets, extra, command);
    c.envs(env.iter().copied());
    finish(&mut c, &stats, timeout)
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Every readable mapping of process `pid`, concatenated: where a test
/// looks for a value that must not be in an application's memory.
pub fn memory_of(pid: u32) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut all = Vec::new();
    for l in maps.lines() {
        let mut f = l.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        if !perms.starts_with('r') || l.contains("[vvar") || l.contains("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.read_exact_at(&mut buf, a).is_ok() {
            all.extend_from_slice(&buf);
        }
    }
    all
}
