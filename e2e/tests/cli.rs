//! `kloak run` input errors and `kloak doctor`, through the real binary.

use std::process::Command;
use std::time::Duration;

use kloak_e2e::*;

const T: Duration = Duration::from_secs(60);

/// Runs `kloak run` with a bad file; the command must not run.
fn refused(yaml: &str) -> String {
    let s = Secrets::raw(yaml);
    let marker = s.dir.path().join("ran");
    let cmd = format!("touch {}", marker.display());
    let run = run_kloak(&s, &[], &["sh", "-c", &cmd], T);
    assert!(!run.output.status.success(), "kloak accepted:\n{yaml}");
    assert!(
        !marker.exists(),
        "the command ran although the secrets file is bad"
    );
    run.stderr()
}

#[test]
fn bad_secrets_files_are_refused_with_the_secret_and_rule_named() {
    let Some(_g) = root_test() else { return };
    let e = refused("secrets:\n  - name: tiny\n    value: \"abc\"\n    env: A\n");
    assert!(e.contains("\"tiny\"") && e.contains("minimum is 8"), "{e}");
    assert!(!e.contains("abc\""), "{e}");

    let long = "q".repeat(200);
    let e = refused(&format!(
        "secrets:\n  - name: huge\n    value: \"{long}\"\n    env: A\n"
    ));
    assert!(
        e.contains("\"huge\"") && e.contains("maximum is 128"),
        "{e}"
    );
    assert!(!e.contains(&long));

    let e = refused(
        "secrets:\n  - name: twin\n    value: \"value-one-1\"\n    env: A\n  - name: twin\n    value: \"value-two-2\"\n    env: B\n",
    );
    assert!(e.contains("\"twin\"") && e.contains("name is used"), "{e}");
    assert!(
        !e.contains("value-one-1") && !e.contains("value-two-2"),
        "{e}"
    );

    let e = refused("");
    assert!(e.contains("is empty"), "{e}");

    let e = refused("secrets:\n  - name: [unclosed\n");
    assert!(e.contains("not valid"), "{e}");
}

#[test]
fn doctor_json_reports_every_check_and_the_backend() {
    let Some(_g) = root_test() else { return };
    let out = output_with_timeout(Command::new(kloak_bin()).args(["doctor", "--json"]), T);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("doctor --json prints JSON");
    assert_eq!(v["ok"], true, "this machine is supported: {v}");
    assert!(out.status.success());
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "kernel",
        "btf",
        "bpffs",
        "bpf_loop",
        "uprobes",
        "dns",
        "tracefs",
        "lockdown",
        "capabilities",
    ] {
        assert!(names.contains(&n), "missing check {n}: {names:?}");
    }
    for c in v["checks"].as_array().unwrap() {
        assert!(c["ok"].is_boolean() && c["detail"].is_string(), "{c}");
    }
    // The backend follows the kernel: TCX (Linux 6.6+) makes it the wire
    // backend, lockdown or not; on 6.18 here it must.
    let release = nix::sys::utsname::uname().unwrap();
    let release = release.release().to_string_lossy();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    if (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (6, 6) {
        assert_eq!(v["backend"], "wire", "{v}");
    }
    let lock = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "lockdown")
        .unwrap();
    assert!(lock["detail"].as_str().unwrap().contains("wire"), "{lock}");
    // Names come from packets where cgroup_skb attaches to the cgroup2 root,
    // as it does on these machines; never from the applications' memory.
    let dns = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "dns")
        .unwrap();
    assert_eq!(dns["ok"], true, "{dns}");
    assert!(
        dns["detail"]
            .as_str()
            .unwrap()
            .contains("DNS source: packets"),
        "{dns}"
    );
}

/// With no `--mode`, `kloak run` serves a placeholder over the wire on this
/// kernel: no stop, the value arrives; and it warns that a writer holding
/// CAP_NET_RAW (root, here) is trusted with its patched packets.
#[test]
fn kloak_run_picks_the_wire_backend_by_itself() {
    let Some(_g) = root_test() else { return };
    let value = random_secret("auto-", 24);
    let s = Secrets::write(&[("t", &value, "T")]);
    let srv = TlsServer::start();
    let cmd = format!(
        "curl -sS --http1.1 --cacert {} -H \"Authorization: Bearer $T\" {}",
        srv.cacert().display(),
        srv.url("/auto")
    );
    let run = run_kloak(&s, &[], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert_eq!(run.stats["backend"], "wire", "{}", run.stats);
    assert_eq!(run.stats["agent"]["wire_armed"], 1, "{}", run.stats);
    // The client ran as root: it could capture its own patched packets.
    assert!(
        run.stderr().contains("CAP_NET_RAW") && run.stderr().contains("comm=curl"),
        "{}",
        run.stderr()
    );
    let rec = srv.records();
    assert_eq!(count(&rec[0], value.as_bytes()), 1);
    run.assert_no_leak(&value);
}

/// The warning names the process that wrote, with the credentials of the
/// image it runs: a command that starts as root and drops CAP_NET_RAW
/// before it execs the client (`setpriv`) gets no warning.
#[test]
fn a_client_that_dropped_cap_net_raw_is_not_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let Some(_g) = root_test() else { return };
    let value = random_secret("noraw-", 24);
    let s = Secrets::write(&[("t", &value, "T")]);
    let srv = TlsServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::copy(srv.cacert(), &ca).unwrap();
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cmd = format!(
        "curl -sS --http1.1 --cacert {} -H \"Authorization: Bearer $T\" {}",
        ca.display(),
        srv.url("/noraw")
    );
    let argv = as_nobody(&["sh", "-c", &cmd]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let run = run_kloak(&s, &["--mode", "wire"], &argv, T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert_eq!(run.stats["agent"]["wire_armed"], 1, "{}", run.stats);
    assert!(!run.stderr().contains("CAP_NET_RAW"), "{}", run.stderr());
    let rec = srv.records();
    assert_eq!(count(&rec[0], value.as_bytes()), 1);
    run.assert_no_leak(&value);
}

#[test]
fn inplace_mode_rewrites_where_allowed_and_is_refused_clearly_where_not() {
    let Some(_g) = root_test() else { return };
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    let locked = lockdown.contains("[integrity]") || lockdown.contains("[confidentiality]");
    let value = random_secret("inplace-", 24);
    let s = Secrets::write(&[("t", &value, "T")]);
    if locked {
        let run = run_kloak(&s, &["--mode", "inplace"], &["true"], T);
        assert!(!run.output.status.success());
        let e = run.stderr();
        assert!(
            e.contains("bpf_probe_write_user") && e.contains("--mode pause"),
            "{e}"
        );
        return;
    }
    // A kernel without lockdown: the BPF program writes the value itself.
    let srv = TlsServer::start();
    let cmd = format!(
        "curl -sS --cacert {} -H \"Authorization: Bearer $T\" -d \"token=$T\" {}",
        srv.cacert().display(),
        srv.url("/inplace")
    );
    let run = run_kloak(&s, &["--mode", "inplace"], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert_eq!(run.stats["backend"], "inplace");
    let rec = srv.records();
    assert_eq!(count(&rec[0], value.as_bytes()), 2);
    run.assert_no_leak(&value);
}

#[test]
fn a_missing_command_is_an_error_not_a_hang() {
    let Some(_g) = root_test() else { return };
    let s = Secrets::write(&[("t", "0123456789abcdef", "T")]);
    let run = run_kloak(&s, &[], &["/nonexistent/binary"], T);
    assert!(!run.output.status.success());
    assert!(
        run.stderr().contains("/nonexistent/binary"),
        "{}",
        run.stderr()
    );
}

#[test]
fn processes_left_stopped_by_a_dead_run_are_continued_at_the_next_start() {
    let Some(_g) = root_test() else { return };
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| {
            p.join("cgroup.procs").exists()
                && std::fs::read_to_string(p.join("cgroup.controllers")).is_ok()
        })
        .expect("a cgroup v2 hierarchy");
    // Agent and guardian both gone (pid 4194303 is beyond pid_max defaults), one process stopped.
    let dead = root.join("kloak/run-4194303");
    std::fs::create_dir_all(&dead).unwrap();
    let mut victim = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(dead.join("cgroup.procs"), victim.id().to_string()).unwrap();
    let pid = nix::unistd::Pid::from_raw(victim.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(proc_state(victim.id()), Some(b'T'));

    let s = Secrets::write(&[("t", "0123456789abcdef", "T")]);
    let run = run_kloak(&s, &[], &["true"], T);
    assert!(run.output.status.success(), "{}", run.stderr());
    assert_ne!(
        proc_state(victim.id()),
        Some(b'T'),
        "the stopped process was not continued"
    );

    victim.kill().unwrap();
    victim.wait().unwrap();
    let _ = std::fs::remove_dir(&dead);
}

#[test]
fn doctor_names_secrets_that_may_go_anywhere() {
    let Some(_g) = root_test() else { return };
    let s = Secrets::raw(
        "secrets:\n  - name: open-one\n    value: \"0123456789abcdef\"\n    env: A\n  - name: closed\n    value: \"fedcba9876543210\"\n    env: B\n    hosts: [api.example.com]\n",
    );
    let out = output_with_timeout(
        Command::new(kloak_bin())
            .args(["doctor", "--json", "--secrets"])
            .arg(&s.path),
        T,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "secrets")
        .expect("a secrets check");
    assert_eq!(c["ok"], false);
    let detail = c["detail"].as_str().unwrap();
    assert!(
        detail.contains("open-one") && !detail.contains("closed"),
        "{detail}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("0123456789abcdef"));
    assert!(
        out.status.success(),
        "an unrestricted secret is a warning, not a failure"
    );
}
