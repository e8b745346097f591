//! The guardian: a small process that outlives the agent for one job. When
//! the agent goes, however it goes (SIGKILL included), its end of a pipe
//! closes; the guardian then sends SIGCONT to every stopped process in the
//! agent's cgroups, repeatedly for a while, because a probe may still have
//! fired in the instant before the kernel detached it.
//!
//! The node agent adds and removes container cgroups as pods come and go by
//! writing `+PATH` and `-PATH` lines on the pipe.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
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

impl Guardian {
    /// Adds (`watch = true`) or removes a cgroup from those swept.
    pub fn watch(&mut self, cgroup: &std::path::Path, watch: bool) {
        let sign = if watch { '+' } else { '-' };
        if let Err(e) = writeln!(self.pipe, "{sign}{}", cgroup.display()) {
            tracing::warn!(error = %e, "telling the guardian about a cgroup failed");
        }
    }
}

pub fn spawn(cgroup: Option<&Cgroup>) -> std::io::Result<Guardian> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("__guardian");
    if let Some(cg) = cgroup {
        cmd.arg("--cgroup").arg(&cg.path);
    }
    let mut child = cmd
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
pub fn run(cgroup: Option<PathBuf>) -> i32 {
    let mut watched: BTreeSet<PathBuf> = cgroup.iter().cloned().collect();
    // Lines until EOF (or an error): the agent's end is gone.
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if let Some(p) = line.strip_prefix('+') {
            watched.insert(PathBuf::from(p));
        } else if let Some(p) = line.strip_prefix('-') {
            watched.remove(std::path::Path::new(p));
        }
    }
    let cgs: Vec<Cgroup> = watched
        .iter()
        .filter_map(|p| Cgroup::open(p).ok())
        .collect();
    let until = Instant::now() + SWEEP_FOR;
    let mut continued = 0u32;
    while Instant::now() < until {
        continued += cgs.iter().map(sweep).sum::<u32>();
        std::thread::sleep(SWEEP_EVERY);
    }
    if continued > 0 {
        eprintln!("kloak guardian: agent gone; continued {continued} stopped process(es)");
    }
    // A standalone run's cgroup is ours: leave no empty one behind once the
    // command's processes are gone. Container cgroups belong to the runtime.
    if let Some(own) = cgroup
        && let Ok(cg) = Cgroup::open(&own)
    {
        while !cg.remove_if_empty() && own.exists() {
            std::thread::sleep(Duration::from_secs(1));
        }
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
