//! Loads the programs through the running kernel's verifier (root only).

use kloak_bpf::{Backend, Config, Probes};

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("this test loads BPF programs and must run as root under CI");
    }
    eprintln!("skipped: needs root");
    false
}

#[test]
fn pause_backend_loads_and_attaches_tracepoints() {
    if !is_root() {
        return;
    }
    let p = Probes::load(&Config::default()).expect("pause backend loads");
    assert_eq!(p.backend(), Backend::Pause);
    // Twelve process/socket hooks; without a cgroup2 root, DNS falls back
    // to the ten receive-syscall tracepoints.
    assert!(matches!(p.dns_hook(), kloak_bpf::DnsHook::Tracepoints(_)));
    assert_eq!(p.tracepoint_count(), 22);
}

/// Where cgroup2 is mounted here, if anywhere.
fn cgroup2_root() -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split_ascii_whitespace().nth(4)?;
            (post.split_ascii_whitespace().next()? == "cgroup2")
                .then(|| std::path::PathBuf::from(mount_point))
        })
        .min_by_key(|p| p.components().count())
}

#[test]
fn dns_packet_programs_load_and_attach_to_the_cgroup2_root() {
    if !is_root() {
        return;
    }
    let root = cgroup2_root().expect("a cgroup2 hierarchy is mounted");
    let p = Probes::load(&Config {
        dns_cgroup: Some(root.clone()),
        ..Config::default()
    })
    .expect("loads with the DNS packet programs");
    assert_eq!(p.dns_hook(), kloak_bpf::DnsHook::Packets(root));
    // No receive-syscall tracepoint where the packet path works: two
    // cgroup links instead of ten.
    assert_eq!(p.tracepoint_count(), 14);
}

/// The experimental implicit-handshake path is dead code to the verifier
/// unless its rodata flag is set: it must pass on its own.
#[test]
fn wire_backend_with_implicit_handshakes_loads() {
    if !is_root() {
        return;
    }
    let p = Probes::load(&Config {
        backend: Backend::Wire,
        wire_implicit: true,
        ..Config::default()
    })
    .expect("wire backend with implicit handshakes loads");
    assert_eq!(p.backend(), Backend::Wire);
}

#[test]
fn wire_backend_loads_and_attaches_to_loopback() {
    if !is_root() {
        return;
    }
    let p = Probes::load(&Config {
        backend: Backend::Wire,
        ..Config::default()
    })
    .expect("wire backend loads");
    assert_eq!(p.backend(), Backend::Wire);
    let lo = nix::net::if_::if_nametoindex("lo").expect("lo exists");
    let _out = p
        .attach_wire(lo, kloak_bpf::WireHook::EgressPatch)
        .expect("tcx egress on lo");
    let _in = p
        .attach_wire(lo, kloak_bpf::WireHook::IngressLearn)
        .expect("tcx ingress on lo");
}

#[test]
fn pid_tracking_follows_forks_and_forgets_exits() {
    if !is_root() {
        return;
    }
    let p = Probes::load(&Config::default()).expect("pause backend loads");
    // A shell that forks a subshell (no exec, so no stop on a new mapping:
    // there is no agent here to continue it) once told to, and reports its pid.
    let mut sh = std::process::Command::new("sh")
        .args(["-c", "echo ready; read x; (read z) & echo $!; read y"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, Write};
    let mut out = std::io::BufReader::new(sh.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let group = 1u64 << 63 | 42;
    p.track_pid(sh.id(), group).unwrap();
    let mut stdin = sh.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let child: u32 = line.trim().parse().unwrap();
    assert_eq!(p.pid_group(child), Some(group), "the fork was followed");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while p.pid_group(child).is_some() {
        assert!(
            std::time::Instant::now() < end,
            "the exit was not forgotten"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    p.untrack_pids(group);
    assert_eq!(p.pid_group(sh.id()), None);
    drop(stdin);
    let _ = sh.wait();
}

#[test]
fn inplace_programs_pass_the_verifier_with_the_write_helper_swapped() {
    if !is_root() {
        return;
    }
    kloak_bpf::verify_inplace_programs().expect("in-place programs pass the verifier");
}

#[test]
fn inplace_backend_is_refused_under_lockdown_but_named_clearly() {
    if !is_root() {
        return;
    }
    let allowed = kloak_bpf::features::probe_write_user().expect("helper probe runs");
    let r = Probes::load(&Config {
        backend: Backend::InPlace,
        ..Config::default()
    });
    assert_eq!(
        r.is_ok(),
        allowed,
        "load result must follow the helper probe"
    );
}

#[test]
fn ring_size_must_be_a_power_of_two() {
    let r = Probes::load(&Config {
        ring_bytes: 5000,
        ..Config::default()
    });
    assert!(matches!(r, Err(kloak_bpf::Error::RingSize(5000))));
}
