//! Restart benchmark: from the controller's process start to ready (every
//! map loaded from the state file, probes attached to a running TLS
//! process) with 10,000 secrets, 1,000 DNS answers and 10,000 open
//! connections in the file. Baseline in the same run: the same start from
//! an empty state file. The connections are real sockets this process
//! holds open (the agent checks each against the kernel's socket table),
//! and the DNS answers belong to this live process too.
//!
//! `sudo scripts/bench.sh` runs it; it writes target/bench/startup.json.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use kloak_e2e::k8s::{FakeContainer, Kloak, control_plane};
use kloak_e2e::{http_get, workspace_root};
use kloak_storage::{
    Batch, ConnKey, ConnRecord, DnsRecord, Key, SecretRecord, Store, TrackedRecord,
};

const SECRETS: usize = 10_000;
const DNS: usize = 1_000;
const CONNS: usize = 10_000;
const RUNS_DEFAULT: usize = 5;
const CROCKFORD: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

fn start_time(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    rest.split_ascii_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

fn random_chars(n: usize, from: &[u8]) -> String {
    (0..n)
        .map(|_| from[rand::random_range(0..from.len())] as char)
        .collect()
}

/// A state file as an agent serving all of this would have left it.
fn write_state(dir: &Path, full: bool, conns: &[std::net::TcpStream], container: &FakeContainer) {
    std::fs::create_dir_all(dir).unwrap();
    let key_path = dir.join("state.key");
    std::fs::write(&key_path, [0x42u8; 32]).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (store, _) = Store::open(&dir.join("state.redb"), Key::from_bytes(&[0x42; 32])).unwrap();
    if !full {
        return;
    }
    let me = std::process::id();
    let st = start_time(me);
    let mut b = Batch::default();
    for i in 0..SECRETS {
        let value = random_chars(32, b"abcdefghijklmnopqrstuvwxyz0123456789");
        b.secrets.push(SecretRecord {
            id: i as u32 + 1,
            name: format!("bench/s{i}/token"),
            placeholder: format!("kloak:{}", random_chars(26, CROCKFORD)),
            value: value.into_bytes(),
            hosts: vec!["api.example.com".into()],
            ports: vec![443],
            require_wire: false,
        });
    }
    for i in 0..DNS {
        b.dns.push(DnsRecord {
            tgid: me,
            start_time: st,
            ip: format!("10.1.{}.{}", i / 250, i % 250),
            name: format!("svc-{i}.bench.svc.cluster.local"),
            seen_ns: 1,
            expires_ns: u64::MAX / 2,
        });
    }
    let me_fd = |s: &std::net::TcpStream| std::os::fd::AsRawFd::as_raw_fd(s);
    for s in conns {
        b.conns.push((
            ConnKey {
                tgid: me,
                start_time: st,
                fd: me_fd(s),
            },
            ConnRecord {
                dest: s.peer_addr().unwrap().to_string(),
                connected_ns: 1,
            },
        ));
    }
    b.tracked.push(TrackedRecord {
        id: std::fs::metadata(&container.cgroup).unwrap().ino(),
        cgroup: container.cgroup.clone(),
        by_pid: false,
        pod: "bench/app".into(),
        container: "app".into(),
        secrets: (1..=SECRETS as u32).collect(),
    });
    store.apply(&b).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for f in ["state.redb", "state.key"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

struct Run {
    wall_ms: f64,
    internal_ms: u64,
    restored: String,
}

fn one_run(kc: &Path, state_dir: &Path, log: &str) -> Run {
    let state = state_dir.join("state.redb").display().to_string();
    let t0 = Instant::now();
    let mut k = Kloak::start(
        &[
            "controller",
            "--no-webhook-cert",
            "--resync-secs",
            "3600",
            "--max-secrets",
            "16384",
            "--state",
            &state,
            "--admin-listen",
            "127.0.0.1:0",
        ],
        kc,
        "node-bench",
        log,
    );
    let addr = k.admin_addr();
    let end = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (code, body) = http_get(addr, "/readyz");
        if code == 200 {
            break body;
        }
        assert!(
            Instant::now() < end,
            "never ready: {body}\n{}",
            k.log_text()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (_, metrics) = http_get(addr, "/metrics");
    let restored: String = metrics
        .lines()
        .filter(|l| l.starts_with("kloak_state_restored_records{"))
        .collect::<Vec<_>>()
        .join(" ");
    k.stop();
    Run {
        wall_ms,
        internal_ms: v["ready_after_ms"].as_u64().unwrap_or(0),
        restored,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the startup benchmark loads BPF programs: run as root"
    );
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-startup").await;

    // 10,000 open connections: this process holds the client ends, a
    // Python listener the other ends (one process could not hold both
    // under this VM's 20,000-descriptor limit).
    let mut holder = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket, sys\n\
             l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(4096)\n\
             print(l.getsockname()[1], flush=True)\n\
             held = [l.accept()[0] for _ in range(int(sys.argv[1]))]\n\
             print('HELD', flush=True); sys.stdin.read()",
            &CONNS.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", line.trim()).parse().unwrap();
    let conns: Vec<std::net::TcpStream> = (0..CONNS)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "HELD");

    // A running TLS process in a tracked container: attaching to its libssl
    // is part of getting ready.
    let mut container = FakeContainer::new(&format!("bench-{}", std::process::id()), false);
    let child = container.spawn(
        &[
            "python3".into(),
            "-c".into(),
            "import ssl, sys; print('READY', flush=True); sys.stdin.read()".into(),
        ],
        &[],
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();

    let base = cp.dir.join("startup-bench");
    let full = base.join("full");
    let empty = base.join("empty");
    write_state(&full, true, &conns, &container);
    write_state(&empty, false, &conns, &container);
    let file_bytes = std::fs::metadata(full.join("state.redb")).unwrap().len();

    let (mut full_wall, mut full_int, mut empty_wall, mut empty_int) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut restored = String::new();
    let runs: usize = std::env::var("KLOAK_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(RUNS_DEFAULT);
    for i in 0..runs {
        let d = base.join(format!("run-empty-{i}"));
        copy_dir(&empty, &d);
        let r = one_run(&kc, &d, &format!("startup-empty-{i}"));
        empty_wall.push(r.wall_ms);
        empty_int.push(r.internal_ms as f64);
        let d = base.join(format!("run-full-{i}"));
        copy_dir(&full, &d);
        let r = one_run(&kc, &d, &format!("startup-full-{i}"));
        for (kind, n) in [
            ("secret", SECRETS),
            ("container", 1),
            ("dns_answer", DNS),
            ("connection", CONNS),
        ] {
            assert!(
                r.restored.contains(&format!("kind=\"{kind}\"}} {n}")),
                "not everything was restored ({kind}): {}",
                r.restored
            );
        }
        restored = r.restored;
        full_wall.push(r.wall_ms);
        full_int.push(r.internal_ms as f64);
        eprintln!(
            "run {i}: empty {:.0} ms, full {:.0} ms",
            empty_wall[i], full_wall[i]
        );
    }
    let out = serde_json::json!({
        "secrets": SECRETS, "dns_answers": DNS, "connections": CONNS, "runs": runs,
        "state_file_bytes": file_bytes,
        "ready_wall_ms": {"full_median": median(full_wall.clone()), "full_max": full_wall.iter().cloned().fold(0.0, f64::max),
            "empty_median": median(empty_wall.clone()), "all_full": full_wall, "all_empty": empty_wall},
        "ready_internal_ms": {"full_median": median(full_int), "empty_median": median(empty_int)},
        "restored_metrics": restored,
        "target_ms": 500,
    });
    let _ = holder.kill();
    let _ = holder.wait();
    let path = workspace_root().join("target/bench/startup.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
