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
    // Ten process/socket hooks, plus the DNS hook: four kprobe links where
    // the kernel has kprobes, ten syscall tracepoints elsewhere. The kprobe
    // programs pass the verifier either way: they load with the rest.
    if std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
        assert_eq!(p.dns_hook(), kloak_bpf::DnsHook::Kprobe);
        assert_eq!(p.tracepoint_count(), 15);
    } else {
        assert_eq!(p.dns_hook(), kloak_bpf::DnsHook::Tracepoints);
        assert_eq!(p.tracepoint_count(), 21);
    }
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
