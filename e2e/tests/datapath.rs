//! The data path end to end: real TLS clients under `kloak run`, a real TLS
//! server that records what arrives. Root only.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kloak_e2e::*;

const T: Duration = Duration::from_secs(90);

fn one_secret(value: &str) -> Secrets {
    Secrets::write(&[("api-token", value, "API_TOKEN")])
}

/// Each request must carry the real value exactly `per_request` times and no placeholder.
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

#[test]
fn curl_sends_the_real_value_in_header_and_body() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("sk-curl-", 40);
    let s = one_secret(&value);
    let cmd = format!(
        "curl -sS --http1.1 --cacert {} -H \"Authorization: Bearer $API_TOKEN\" -d \"token=$API_TOKEN\" {}",
        srv.cacert().display(),
        srv.url("/curl")
    );
    let run = run_kloak(&s, &[], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert_all_real(&srv.records(), &value, 2);
    run.assert_no_leak(&value);
}

#[test]
fn python_urllib_and_http_client_send_the_real_value() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("py-", 24);
    let s = one_secret(&value);
    for mode in ["urllib", "httpclient"] {
        let run = run_kloak(&s, &[], &strs(&py_cmd(mode, &srv, &[])), T);
        assert!(run.output.status.success(), "{mode}: {}", run.stderr());
        run.assert_no_leak(&value);
    }
    let rec = srv.records();
    assert_eq!(rec.len(), 2);
    assert_all_real(&rec, &value, 2);
}

/// Runs the Go client under Kloak: `workers` goroutines × `each` requests,
/// each carrying the secret's placeholder twice; every request must arrive real.
fn go_clients_send_real_values(prefix: &str, workers: u32, each: u32) {
    let go = go_client();
    let srv = TlsServer::start();
    let value = random_secret(prefix, 33);
    let s = one_secret(&value);
    let ca = srv.cacert().display().to_string();
    let url = srv.url("/go");
    let (c, n) = (workers.to_string(), each.to_string());
    let args = [
        go.to_str().unwrap(),
        "-url",
        &url,
        "-cacert",
        &ca,
        "-c",
        &c,
        "-n",
        &n,
    ];
    let run = run_kloak(&s, &[], &args, T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let rec = srv.records();
    assert_eq!(rec.len(), (workers * each) as usize);
    assert_all_real(&rec, &value, 2);
    run.assert_no_leak(&value);
}

#[test]
fn go_net_http_sends_the_real_value() {
    let Some(_g) = root_test() else { return };
    go_clients_send_real_values("go-", 1, 3);
}

#[test]
fn the_child_environment_holds_only_the_placeholder() {
    let Some(_g) = root_test() else { return };
    let value = random_secret("env-", 20);
    let s = one_secret(&value);
    let run = run_kloak(
        &s,
        &[],
        &[
            "sh",
            "-c",
            "printf '%s' \"$API_TOKEN\"; cat /proc/self/environ",
        ],
        T,
    );
    assert!(run.output.status.success(), "{}", run.stderr());
    let out = run.output.stdout.clone();
    let placeholder = String::from_utf8_lossy(&out[..value.len()]).into_owned();
    assert!(placeholder.starts_with("kloak:"), "{placeholder}");
    assert_eq!(placeholder.len(), value.len());
    // Crockford base32, widened to letters, digits, '-' and '_' where that
    // makes the HPACK Huffman code as long as the value's: safe in headers,
    // URLs, JSON and shell words.
    assert!(
        placeholder[6..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
        "unsafe placeholder character: {placeholder}"
    );
    assert_eq!(
        count(&out, placeholder.as_bytes()),
        2,
        "placeholder in $API_TOKEN and in environ"
    );
    run.assert_no_leak(&value);
}

#[test]
fn unknown_tokens_pass_unchanged_and_plain_writes_are_byte_identical() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("known-", 30);
    let s = one_secret(&value);
    let port = srv.port.to_string();
    let ca = srv.cacert().display().to_string();
    let unknown = "kloak:ZZZZZZZZZZZZZZZZZZZZZZZZ";
    let run = run_kloak(
        &s,
        &[],
        &[
            "python3",
            &py_client(),
            "unknown",
            "--port",
            &port,
            "--cacert",
            &ca,
            "--token",
            unknown,
        ],
        T,
    );
    assert!(run.output.status.success(), "{}", run.stderr());
    let rec = srv.records();
    assert_eq!(
        count(&rec[0], unknown.as_bytes()),
        2,
        "unknown token must arrive untouched"
    );
    assert_eq!(count(&rec[0], value.as_bytes()), 0);

    // The same plain request with and without Kloak: identical bytes.
    srv.clear();
    let plain = [
        "python3",
        &py_client(),
        "plain",
        "--port",
        &port,
        "--cacert",
        &ca,
    ];
    let bare = output_with_timeout(std::process::Command::new(plain[0]).args(&plain[1..]), T);
    assert!(bare.status.success());
    let run = run_kloak(&s, &[], &plain, T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let rec = srv.records();
    assert_eq!(rec.len(), 2);
    assert_eq!(
        rec[0], rec[1],
        "a write without placeholders must be byte-identical"
    );
}

/// Reads `len` bytes at `addr` in `pid`, and every readable mapping.
#[test]
fn scrub_puts_the_placeholder_back_into_the_application_buffer() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("scrub-", 32);
    let s = one_secret(&value);
    let (mut c, _) = kloak_cmd(
        &s,
        &[],
        &[
            "python3",
            &py_client(),
            "scrub",
            "--port",
            &srv.port.to_string(),
            "--cacert",
            &srv.cacert().display().to_string(),
        ],
    );
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
    // BUFFER pid=.. addr=.. len=.. intact=True
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("{line}"))
    };
    let pid: u32 = field("pid=").parse().unwrap();
    let addr: u64 = field("addr=").parse().unwrap();
    let len: usize = field("len=").parse().unwrap();
    assert_eq!(
        field("intact="),
        "True",
        "the client saw its buffer changed"
    );

    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap()
        .read_exact_at(&mut buf, addr)
        .unwrap();
    assert_eq!(
        count(&buf, value.as_bytes()),
        0,
        "real value left in the application buffer"
    );
    assert_eq!(
        placeholders_in(&buf, value.len()).len(),
        2,
        "placeholders restored"
    );
    let all = memory_of(pid);
    assert_eq!(
        count(&all, value.as_bytes()),
        0,
        "real value found somewhere in the client's memory"
    );

    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_all_real(&srv.records(), &value, 2);
    assert_eq!(count(&out.stderr, value.as_bytes()), 0);
}

#[test]
fn python_8_threads_x_200_requests_all_arrive_real() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("thr-", 28);
    let s = one_secret(&value);
    let port = srv.port.to_string();
    let ca = srv.cacert().display().to_string();
    let run = run_kloak(
        &s,
        &[],
        &[
            "python3",
            &py_client(),
            "threads",
            "--threads",
            "8",
            "--requests",
            "200",
            "--port",
            &port,
            "--cacert",
            &ca,
        ],
        T,
    );
    assert!(run.output.status.success(), "{}", run.stderr());
    let rec = srv.records();
    assert_eq!(rec.len(), 1600);
    assert_all_real(&rec, &value, 2);
    assert_eq!(run.stats["agent"]["stop_timeouts"], 0);
    run.assert_no_leak(&value);
}

#[test]
fn go_32_goroutines_x_50_requests_all_arrive_real() {
    let Some(_g) = root_test() else { return };
    go_clients_send_real_values("gor-", 32, 50);
}

fn cgroup_of_run(kloak_pid: u32) -> PathBuf {
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let p = PathBuf::from(root).join(format!("kloak/run-{kloak_pid}"));
        if p.exists() {
            return p;
        }
    }
    panic!("no cgroup for kloak run {kloak_pid}");
}

#[test]
fn sigkill_of_the_agent_leaves_nothing_stopped_and_placeholders_go_out_unchanged() {
    let Some(_g) = root_test() else { return };
    let srv = TlsServer::start();
    let value = random_secret("kill-", 30);
    let s = one_secret(&value);
    let port = srv.port.to_string();
    let ca = srv.cacert().display().to_string();
    let (mut c, _) = kloak_cmd(
        &s,
        &[],
        &[
            "python3",
            &py_client(),
            "threads",
            "--threads",
            "4",
            "--requests",
            "600",
            "--port",
            &port,
            "--cacert",
            &ca,
        ],
    );
    let mut agent = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let before = srv.wait_for(200, T).len();
    assert!(before >= 200, "clients did not get going");
    let cg = cgroup_of_run(agent.id());
    let clients = cgroup_pids(&cg);
    assert!(!clients.is_empty());
    agent.kill().unwrap();
    agent.wait().unwrap();
    let killed_at = Instant::now();

    // Watch the clients: none may stay stopped for a second.
    let mut stopped_since: Option<Instant> = None;
    let mut longest = Duration::ZERO;
    while clients
        .iter()
        .any(|&p| proc_state(p).is_some_and(|s| s != b'Z'))
    {
        let any_stopped = clients.iter().any(|&p| proc_state(p) == Some(b'T'));
        match (any_stopped, stopped_since) {
            (true, None) => stopped_since = Some(Instant::now()),
            (true, Some(t)) => longest = longest.max(t.elapsed()),
            (false, _) => stopped_since = None,
        }
        assert!(
            longest < Duration::from_secs(1),
            "a client stayed stopped for {longest:?} after the agent died"
        );
        assert!(killed_at.elapsed() < T, "clients did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    let rec = srv.records();
    assert_eq!(rec.len(), 2400, "every request completed");
    // Before the kill: real value. After it: the placeholder. Never anything else.
    let mut real = 0;
    let mut placeholder = 0;
    for r in &rec {
        let v = count(r, value.as_bytes());
        let p = placeholders_in(r, value.len()).len();
        assert!(
            v + p == 2,
            "request carried neither value nor placeholder: {}",
            String::from_utf8_lossy(r)
        );
        real += usize::from(v == 2);
        placeholder += usize::from(p == 2);
    }
    assert!(
        real >= 200 && placeholder > 0,
        "real={real} placeholder={placeholder}"
    );
}

#[test]
fn a_full_ring_buffer_lets_placeholders_out_unchanged_and_counts_it() {
    let Some(_g) = root_test() else { return };
    ring_full("pause");
}

/// The wire backend needs no agent to patch, but every substitution must be
/// traceable: with no room to report it, nothing is armed.
#[test]
fn a_full_ring_buffer_arms_nothing_on_the_wire() {
    let Some(_g) = root_test() else { return };
    ring_full("wire");
}

fn ring_full(mode: &str) {
    let srv = TlsServer::start();
    let value = random_secret("ring-", 26);
    let s = one_secret(&value);
    let port = srv.port.to_string();
    let ca = srv.cacert().display().to_string();
    let (mut c, stats) = kloak_cmd(
        &s,
        &["--ring-bytes", "4096", "--mode", mode],
        &[
            "python3",
            &py_client(),
            "flood",
            "--port",
            &port,
            "--cacert",
            &ca,
        ],
    );
    let mut agent = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(agent.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY");
    // A stopped agent drains nothing: the flood fills the 4 KiB ring.
    let apid = nix::unistd::Pid::from_raw(agent.id() as i32);
    nix::sys::signal::kill(apid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut stdin = agent.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "SENT",
        "the writer must not wait for a stopped agent when the ring is full"
    );
    nix::sys::signal::kill(apid, nix::sys::signal::Signal::SIGCONT).unwrap();
    drop(stdin);
    let st = agent.wait().unwrap();
    assert!(st.success());
    let rec = srv.records();
    let last = rec.last().unwrap();
    assert_eq!(count(last, value.as_bytes()), 0, "{mode}");
    assert_eq!(
        placeholders_in(last, value.len()).len(),
        2,
        "{mode}: placeholder went out unchanged"
    );
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(stats).unwrap()).unwrap();
    assert!(
        stats["bpf"]["lost_events"].as_u64().unwrap() > 0,
        "lost events counted: {stats}"
    );
}

#[test]
fn the_exit_code_of_the_command_is_kloaks() {
    let Some(_g) = root_test() else { return };
    let s = one_secret(&random_secret("exit-", 12));
    let run = run_kloak(&s, &[], &["sh", "-c", "exit 7"], T);
    assert_eq!(run.output.status.code(), Some(7));
}

/// One raw request in `mode` with `expected` placeholders, all of which must
/// arrive real; `path` names the kernel counter that proves which path ran.
fn raw_request_test(mode: &str, expected: usize, path: Option<&str>) {
    let srv = TlsServer::start();
    let value = random_secret(&format!("{mode}-"), 30);
    let s = one_secret(&value);
    let run = run_kloak(&s, &[], &strs(&py_cmd(mode, &srv, &[])), T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert!(
        run.stdout().contains(&format!("placeholders={expected}")),
        "{}",
        run.stdout()
    );
    let rec = srv.records();
    assert_eq!(rec.len(), 1);
    assert_eq!(
        count(&rec[0], value.as_bytes()),
        expected,
        "every placeholder replaced"
    );
    assert_eq!(count(&rec[0], b"kloak:"), 0);
    run.assert_no_leak(&value);
    if let Some(counter) = path {
        assert!(
            run.stats["bpf"][counter].as_u64() >= Some(1),
            "the {counter} path did not run: {}",
            run.stats
        );
    }
}

#[test]
fn placeholders_across_scan_chunk_edges_and_deep_in_large_writes_are_found() {
    let Some(_g) = root_test() else { return };
    raw_request_test("edges", 5, None);
}

#[test]
fn more_placeholders_than_the_kernel_tracks_are_all_replaced() {
    let Some(_g) = root_test() else { return };
    raw_request_test("many", 12, Some("overflow"));
}

#[test]
fn a_buffer_the_kernel_cannot_read_yet_is_scanned_by_the_agent() {
    let Some(_g) = root_test() else { return };
    raw_request_test("mmap", 3, Some("unreadable"));
}

#[test]
fn programs_started_later_and_libraries_loaded_later_are_followed() {
    let Some(_g) = root_test() else { return };
    let go = go_client();
    let srv = TlsServer::start();
    let value = random_secret("later-", 27);
    let s = one_secret(&value);
    let ca = srv.cacert().display().to_string();
    // A shell that execs a static Go binary and a Python whose libssl arrives
    // by dlopen only when it imports ssl, both well after the start.
    let cmd = format!(
        "sleep 0.3; {go} -url {url} -cacert {ca} -n 1; \
         python3 -c 'import time; time.sleep(0.3); import runpy, sys; \
         sys.argv = [\"c\", \"httpclient\", \"--port\", \"{port}\", \"--cacert\", \"{ca}\"]; \
         runpy.run_path(\"{py}\", run_name=\"__main__\")'",
        go = go.display(),
        url = srv.url("/later"),
        port = srv.port,
        py = py_client(),
    );
    let run = run_kloak(&s, &[], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    let rec = srv.records();
    assert_eq!(rec.len(), 2);
    assert_all_real(&rec, &value, 2);
    run.assert_no_leak(&value);
}
