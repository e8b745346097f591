//! The guardian: a small process that outlives the agent for one job. When
//! the agent goes, however it goes (SIGKILL included), its end of a pipe
//! closes; the guardian then sends SIGCONT to every stopped process in the
//! agent's cgroups, repeatedly for a while, because a probe may still have
//! fired in the instant before the kernel detached it.
//!
//! The node agent adds and removes container cgroups as pods come and go by
//! writing `+PATH` and `-PATH` lines on the pipe.
//!
//! A restarted node agent must not share the node with its predecessor's
//! guardian: that guardian's SIGCONT could land between a stop the new
//! agent's probe made and the patch, and the write would go out as it was.
//! Each node-agent guardian therefore carries an owner (the state file's
//! path) and its agent's pid on its command line, and the successor retires
//! it (see [`retire_predecessors`]) before it attaches anything.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::datapath::cgroup::Cgroup;
use crate::datapath::stops::proc_state;

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

/// Starts the guardian. `owner` names what a successor agent takes over
/// (the node agent's state file); a `kloak run` has none.
pub fn spawn(cgroup: Option<&Cgroup>, owner: Option<&str>) -> std::io::Result<Guardian> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("__guardian");
    if let Some(cg) = cgroup {
        cmd.arg("--cgroup").arg(&cg.path);
    }
    if let Some(o) = owner {
        cmd.arg("--owner")
            .arg(o)
            .arg("--agent")
            .arg(std::process::id().to_string());
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
    // A successor agent's request to finish: one last sweep, then exit.
    let retire = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGUSR1, retire.clone());
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
        if retire.load(Ordering::Relaxed) {
            break;
        }
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

/// How long a successor waits for its predecessor's exit to finish (the
/// kernel detaches its probes as it closes their descriptors).
const PREDECESSOR_EXIT: Duration = Duration::from_secs(5);

/// A guardian left by an earlier agent with the same owner.
#[derive(Debug, PartialEq, Eq)]
struct Predecessor {
    guardian: u32,
    agent: Option<u32>,
}

/// Parses a guardian's NUL-separated command line; `Some` if it guards `owner`.
fn predecessor_of(pid: u32, cmdline: &[u8], owner: &str) -> Option<Predecessor> {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    if !args.iter().any(|a| *a == b"__guardian") {
        return None;
    }
    let value = |flag: &[u8]| {
        args.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| String::from_utf8_lossy(w[1]).into_owned())
    };
    (value(b"--owner")? == owner).then(|| Predecessor {
        guardian: pid,
        agent: value(b"--agent").and_then(|a| a.parse().ok()),
    })
}

/// Running (not a zombie, not gone).
fn running(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| proc_state(&s))
        .is_some_and(|st| !matches!(st, b'Z' | b'X' | b'x'))
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while running(pid) {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Retires the guardians an earlier agent with this `owner` left: waits for
/// that agent's exit to finish (its probes detached, so it can stop nothing
/// more), then asks each guardian for one last sweep and its exit (SIGUSR1).
/// Call it before attaching anything: from then on nothing but this agent
/// continues what its probes stop. Returns how many it retired.
pub fn retire_predecessors(owner: &str) -> usize {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let found: Vec<Predecessor> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            predecessor_of(pid, &cmd, owner)
        })
        .collect();
    for p in &found {
        if let Some(agent) = p.agent.filter(|&a| a != me)
            && !wait_gone(agent, PREDECESSOR_EXIT)
        {
            tracing::warn!(
                pid = agent,
                "the previous agent is still exiting after {PREDECESSOR_EXIT:?}; taking over anyway"
            );
        }
        let g = Pid::from_raw(p.guardian as i32);
        let _ = kill(g, Signal::SIGUSR1);
        if !wait_gone(p.guardian, Duration::from_secs(1)) {
            let _ = kill(g, Signal::SIGKILL);
            wait_gone(p.guardian, Duration::from_secs(1));
        }
        tracing::info!(
            guardian = p.guardian,
            agent = p.agent,
            "retired the previous agent's guardian"
        );
    }
    found.len()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guardian_is_a_predecessor_only_for_its_owner() {
        let cmd = b"/usr/bin/kloak\0__guardian\0--owner\0/run/kloak/state.redb\0--agent\x0042\0";
        assert_eq!(
            predecessor_of(7, cmd, "/run/kloak/state.redb"),
            Some(Predecessor {
                guardian: 7,
                agent: Some(42)
            })
        );
        assert_eq!(predecessor_of(7, cmd, "/other/state.redb"), None);
        let run = b"/usr/bin/kloak\0__guardian\0--cgroup\0/sys/fs/cgroup/kloak/run-1\0";
        assert_eq!(predecessor_of(7, run, "/run/kloak/state.redb"), None);
        let not = b"/usr/bin/kloak\0controller\0--owner\0/run/kloak/state.redb\0";
        assert_eq!(predecessor_of(7, not, "/run/kloak/state.redb"), None);
    }

    #[test]
    fn wait_gone_sees_a_reaped_child() {
        let mut c = Command::new("sleep").arg("0.05").spawn().unwrap();
        let pid = c.id();
        assert!(running(pid));
        let _ = c.wait();
        assert!(wait_gone(pid, Duration::from_secs(1)));
    }
}
