//! The guardian: a small process that outlives the agent for one job. When
//! the agent goes, however it goes (SIGKILL included), its end of a pipe
//! closes; the guardian then sends SIGCONT to every stopped process in the
//! agent's cgroups, repeatedly for a while, because a probe may still have
//! fired in the instant before the kernel detached it.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::agent::proc_state;
use crate::cgroup::Cgroup;

/// How long after the agent's death the guardian keeps sweeping.
const SWEEP_FOR: Duration = Duration::from_secs(2);
const SWEEP_EVERY: Duration = Duration::from_millis(10);

/// The agent's end of the pipe: dropping it (or dying) sets the guardian off.
pub struct Guardian {
    pub pipe: ChildStdin,
}

pub fn spawn(cgroup: &Cgroup) -> std::io::Result<Guardian> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("__guardian")
        .arg("--cgroup")
        .arg(&cgroup.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        // Its own process group: a Ctrl-C meant for the agent must not take it too.
        .process_group(0)
        .spawn()?;
    let pipe = child.stdin.take().expect("stdin was piped");
    // Not waited for: it outlives this process when it must.
    drop(child);
    Ok(Guardian { pipe })
}

/// Body of `kloak __guardian`.
pub fn run(cgroup: PathBuf) -> i32 {
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 64];
    // Returns 0 (EOF) or an error once the agent's end is gone.
    while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
    let Ok(cg) = Cgroup::open(&cgroup) else {
        return 0;
    };
    let until = Instant::now() + SWEEP_FOR;
    let mut continued = 0u32;
    while Instant::now() < until {
        continued += sweep(&cg);
        std::thread::sleep(SWEEP_EVERY);
    }
    if continued > 0 {
        eprintln!("kloak guardian: agent gone; continued {continued} stopped process(es)");
    }
    // Leave no empty cgroup behind once the command's processes are gone.
    while !cg.remove_if_empty() && cgroup.exists() {
        std::thread::sleep(Duration::from_secs(1));
    }
    0
}

/// SIGCONT to every stopped process in the cgroup; returns how many.
pub fn sweep(cg: &Cgroup) -> u32 {
    let mut n = 0;
    for pid in cg.pids() {
        let stopped =
            std::fs::read(format!("/proc/{pid}/stat")).is_ok_and(|s| proc_state(&s) == Some(b'T'));
        if stopped && kill(Pid::from_raw(pid as i32), Signal::SIGCONT).is_ok() {
            n += 1;
        }
    }
    n
}
