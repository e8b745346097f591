//! `kloak doctor`: the seed's verification checklist, run natively.

use std::path::Path;

use kloak_bpf::{Backend, features};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// A failed hard check means the agent cannot work on this node.
    #[serde(skip)]
    pub hard: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub backend: &'static str,
    pub checks: Vec<Check>,
}

const MIN_KERNEL: (u32, u32) = (5, 17);

pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn check(name: &'static str, hard: bool, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok,
        detail: detail.into(),
        hard,
    }
}

fn mounted(fstype: &str) -> Option<String> {
    let m = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    m.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_ascii_whitespace().next()? == fstype).then(|| {
            pre.split_ascii_whitespace()
                .nth(4)
                .unwrap_or("?")
                .to_string()
        })
    })
}

/// The lockdown mode, mounting securityfs to read it if needed.
pub fn lockdown() -> Option<String> {
    let p = Path::new("/sys/kernel/security/lockdown");
    if !p.exists() {
        let _ = nix::mount::mount(
            Some("securityfs"),
            "/sys/kernel/security",
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    let s = std::fs::read_to_string(p).ok()?;
    // "none [integrity] confidentiality": the bracketed word is in force.
    let start = s.find('[')?;
    let end = s[start..].find(']')?;
    Some(s[start + 1..start + end].to_string())
}

/// The backend `--mode auto` picks: wire wherever tc programs attach
/// through TCX (the real value never enters the application, and nothing
/// is stopped); else in-place where the verifier lets a uprobe call
/// bpf_probe_write_user; else pause.
pub fn auto_backend() -> Backend {
    if features::tcx().unwrap_or(false) {
        return Backend::Wire;
    }
    match features::probe_write_user() {
        Ok(true) => Backend::InPlace,
        _ => Backend::Pause,
    }
}

/// The kernel that first casts a cgroup_skb program's context to the
/// kernel's sk_buff (`bpf_cast_to_kern_ctx`), which the DNS packet path reads
/// the socket's namespace through.
const DNS_PACKETS_KERNEL: (u32, u32) = (6, 2);

/// Where the agent will learn DNS answers on this node, as
/// `Probes::load` decides it: from packets when a cgroup_skb program
/// attaches to the cgroup2 root, else from the receive syscalls.
fn dns_source(kernel: Option<(u32, u32)>) -> (bool, String) {
    const FALLBACK: &str = "DNS source: fallback, syscall tracepoints (recvfrom, recvmsg, recvmmsg, read, readv) reading the applications' memory; a hostile application can forge which address a name has";
    let root = match crate::datapath::cgroup::cgroup2_root() {
        Ok(r) => r,
        Err(e) => return (false, format!("{FALLBACK} ({e})")),
    };
    if kernel.is_some_and(|v| v < DNS_PACKETS_KERNEL) {
        return (
            false,
            format!(
                "{FALLBACK} (the packet path needs Linux {}.{}+)",
                DNS_PACKETS_KERNEL.0, DNS_PACKETS_KERNEL.1
            ),
        );
    }
    match features::cgroup_skb(&root) {
        Ok(true) => (
            true,
            format!(
                "DNS source: packets, cgroup_skb egress/ingress on {} (answers as the kernel received them, matched to the query their socket sent)",
                root.display()
            ),
        ),
        Ok(false) => (
            false,
            format!(
                "{FALLBACK} (a cgroup_skb program does not attach to {})",
                root.display()
            ),
        ),
        Err(e) => (
            false,
            format!(
                "{FALLBACK} (probing cgroup_skb on {} failed with error {e})",
                root.display()
            ),
        ),
    }
}

pub fn run_checks() -> Report {
    let mut checks = Vec::new();

    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let kv = parse_kernel_release(&release);
    checks.push(check(
        "kernel",
        true,
        kv.is_some_and(|v| v >= MIN_KERNEL),
        format!(
            "{release}; Kloak needs {}.{} or later for bpf_loop",
            MIN_KERNEL.0, MIN_KERNEL.1
        ),
    ));

    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    checks.push(check(
        "btf",
        true,
        btf,
        if btf {
            "/sys/kernel/btf/vmlinux present (CO-RE works)".into()
        } else {
            "/sys/kernel/btf/vmlinux missing: the kernel lacks CONFIG_DEBUG_INFO_BTF".to_string()
        },
    ));

    let bpffs = mounted("bpf");
    checks.push(check(
        "bpffs",
        false,
        bpffs.is_some(),
        match &bpffs {
            Some(p) => format!("mounted at {p}"),
            None => {
                "not mounted; the agent pins nothing yet, `mount -t bpf bpf /sys/fs/bpf` adds it"
                    .into()
            }
        },
    ));

    let root = nix::unistd::geteuid().is_root();
    let (ok, detail) = match features::bpf_loop() {
        Ok(true) => (
            true,
            "the verifier accepts bpf_loop in uprobe programs".to_string(),
        ),
        Ok(false) => (
            false,
            "the verifier does not know bpf_loop (kernel older than 5.17?)".to_string(),
        ),
        Err(e) if !root => (false, format!("cannot probe without root (error {e})")),
        Err(e) => (false, format!("probe failed with error {e}")),
    };
    checks.push(check("bpf_loop", true, ok, detail));

    let (ok, detail) = match features::ringbuf() {
        Ok(true) => (true, "BPF ring buffers available".to_string()),
        Ok(false) => (false, "BPF_MAP_TYPE_RINGBUF unsupported".to_string()),
        Err(e) => (false, format!("probe failed with error {e}")),
    };
    checks.push(check("ringbuf", true, ok, detail));

    let (ok, detail) = match features::send_signal_thread() {
        Ok(true) => (
            true,
            "bpf_send_signal_thread available (pause backend)".to_string(),
        ),
        Ok(false) => (
            false,
            "bpf_send_signal_thread unsupported: the pause backend cannot work".to_string(),
        ),
        Err(e) => (false, format!("probe failed with error {e}")),
    };
    checks.push(check("send_signal_thread", false, ok, detail));

    let uprobe = Path::new("/sys/bus/event_source/devices/uprobe/type").exists();
    checks.push(check(
        "uprobes",
        true,
        uprobe,
        if uprobe {
            "uprobe PMU present".to_string()
        } else {
            "no uprobe PMU at /sys/bus/event_source/devices/uprobe: CONFIG_UPROBES is off"
                .to_string()
        },
    ));

    let (ok, detail) = dns_source(kv);
    checks.push(check("dns", false, ok, detail));

    let tracefs = Path::new("/sys/kernel/tracing/events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists();
    let (ok, detail) = if tracefs {
        (true, "tracefs mounted".to_string())
    } else if root {
        match kloak_bpf::ensure_tracefs() {
            Ok(()) => (
                true,
                format!(
                    "tracefs was not mounted; mounted it at {}",
                    kloak_bpf::TRACEFS
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    } else {
        (
            false,
            "tracefs not mounted and mounting needs root".to_string(),
        )
    };
    checks.push(check("tracefs", true, ok, detail));

    let lock = lockdown();
    let backend = auto_backend();
    checks.push(check(
        "lockdown",
        false,
        true,
        format!(
            "lockdown: {}; rewrite backend: {} ({})",
            lock.as_deref().unwrap_or("unknown"),
            backend.as_str(),
            match backend {
                Backend::InPlace => "bpf_probe_write_user allowed",
                Backend::Pause =>
                    "bpf_probe_write_user refused, writers are paused and patched from user space",
                Backend::Wire =>
                    "TCX available: records are patched on the wire by tc programs, the pause backend serves what they cannot",
            }
        ),
    ));

    let needed = [
        caps::Capability::CAP_BPF,
        caps::Capability::CAP_PERFMON,
        caps::Capability::CAP_SYS_ADMIN,
        caps::Capability::CAP_SYS_PTRACE,
        caps::Capability::CAP_KILL,
    ];
    let have = caps::read(None, caps::CapSet::Effective).unwrap_or_default();
    let missing: Vec<String> = needed
        .iter()
        .filter(|c| !have.contains(c))
        .map(|c| c.to_string())
        .collect();
    checks.push(check(
        "capabilities",
        true,
        missing.is_empty(),
        if missing.is_empty() {
            "CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_KILL effective".to_string()
        } else {
            format!("missing: {}", missing.join(", "))
        },
    ));

    let ok = checks.iter().all(|c| c.ok || !c.hard);
    Report {
        ok,
        backend: backend.as_str(),
        checks,
    }
}

/// Adds a check of a secrets file: it must load (a hard failure otherwise),
/// and secrets without `hosts`/`port` are named, since any destination
/// receives them.
pub fn check_secrets(report: &mut Report, path: &Path) {
    let c = match crate::datapath::secrets::load(path) {
        Err(e) => check("secrets", true, false, e.to_string()),
        Ok(list) => {
            let names = |f: &dyn Fn(&crate::datapath::secrets::Secret) -> bool| {
                list.iter()
                    .filter(|s| f(s))
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let open = names(&|s| s.rules.unrestricted());
            let no_h2 = names(&|s| !s.hpack_safe);
            let mut problems = Vec::new();
            if !open.is_empty() {
                problems.push(format!(
                    "unrestricted (no hosts or port; any destination receives them): {open}"
                ));
            }
            if !no_h2.is_empty() {
                problems.push(format!(
                    "not HPACK-safe (HTTP/2 header values carry the placeholder unchanged): {no_h2}"
                ));
            }
            if problems.is_empty() {
                check(
                    "secrets",
                    false,
                    true,
                    format!(
                        "{} secret(s), all with destination rules, all HPACK-safe",
                        list.len()
                    ),
                )
            } else {
                check("secrets", false, false, problems.join("; "))
            }
        }
    };
    report.ok &= c.ok || !c.hard;
    report.checks.push(c);
}

/// The message the agent refuses to start with; None when the node is fit.
pub fn refusal(report: &Report) -> Option<String> {
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| c.hard && !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    (!failed.is_empty()).then(|| format!("this node cannot run Kloak:\n  {}", failed.join("\n  ")))
}

pub fn print_text(r: &Report) {
    for c in &r.checks {
        let mark = if c.ok {
            "ok  "
        } else if c.hard {
            "FAIL"
        } else {
            "warn"
        };
        println!("[{mark}] {:<20} {}", c.name, c.detail);
    }
    println!(
        "{}: rewrite backend {}",
        if r.ok {
            "node is ready"
        } else {
            "node is NOT ready"
        },
        r.backend
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_parsing() {
        assert_eq!(parse_kernel_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_release("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_kernel_release("5.4.0").unwrap() < MIN_KERNEL);
        assert!(parse_kernel_release("5.17.1").unwrap() >= MIN_KERNEL);
        assert_eq!(parse_kernel_release("garbage"), None);
    }
}
