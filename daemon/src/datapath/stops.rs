//! Waiting for a whole thread group to stop. The pause backend patches a
//! buffer only when every thread of the writer's process is in group stop:
//! a thread still running could read the buffer half-patched, or race the
//! SIGCONT that would discard its own pending stop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, PartialEq, Eq)]
pub enum GroupState {
    Stopped,
    Gone,
    TimedOut,
}

/// Polls of a stopping group that yield the CPU instead of sleeping.
const YIELD_SPINS: u32 = 400;
/// Thread groups whose /proc files stay open between stops.
const MAX_CACHED_GROUPS: usize = 1024;

/// Open /proc stat files of the thread groups the agent stops. Re-reading an
/// open /proc file skips the path walk, and keeping the thread list avoids a
/// directory read per stop; the group's thread count tells when it is stale.
#[derive(Default)]
pub struct Groups {
    map: HashMap<u32, Group>,
}

struct Group {
    stat: std::fs::File,
    tasks: Vec<(u32, std::fs::File)>,
}

impl Group {
    fn open(tgid: u32) -> Option<Group> {
        let stat = std::fs::File::open(format!("/proc/{tgid}/stat")).ok()?;
        let mut g = Group {
            stat,
            tasks: Vec::new(),
        };
        g.refresh(tgid)?;
        Some(g)
    }

    fn refresh(&mut self, tgid: u32) -> Option<()> {
        let rd = std::fs::read_dir(format!("/proc/{tgid}/task")).ok()?;
        self.tasks = rd
            .filter_map(|d| d.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|t| {
                Some((
                    t,
                    std::fs::File::open(format!("/proc/{tgid}/task/{t}/stat")).ok()?,
                ))
            })
            .collect();
        Some(())
    }
}

fn read_stat<'b>(f: &std::fs::File, buf: &'b mut [u8; 1024]) -> Option<&'b [u8]> {
    let n = std::os::unix::fs::FileExt::read_at(f, buf, 0).ok()?;
    (n > 0).then_some(&buf[..n])
}

/// Field 20 of /proc/PID/stat.
fn num_threads(stat: &[u8]) -> Option<usize> {
    let close = stat.iter().rposition(|&c| c == b')')?;
    std::str::from_utf8(&stat[close + 2..])
        .ok()?
        .split_ascii_whitespace()
        .nth(17)?
        .parse()
        .ok()
}

impl Groups {
    /// Waits until every thread of `tgid` is in group stop.
    pub fn wait_stopped(&mut self, tgid: u32, timeout: Duration) -> GroupState {
        if self.map.len() > MAX_CACHED_GROUPS {
            self.map.clear();
        }
        let g = match self.map.entry(tgid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match Group::open(tgid) {
                Some(g) => v.insert(g),
                None => return GroupState::Gone,
            },
        };
        let r = wait_group(tgid, g, timeout);
        if r == GroupState::Gone {
            self.map.remove(&tgid);
        }
        r
    }
}

fn wait_group(tgid: u32, g: &mut Group, timeout: Duration) -> GroupState {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1024];
    let mut spins = 0u32;
    loop {
        let mut all_stopped = true;
        let mut live = 0usize;
        let mut stale = false;
        for (_, f) in &g.tasks {
            match read_stat(f, &mut buf).and_then(proc_state) {
                // Gone since the list was made.
                None => stale = true,
                Some(b'Z' | b'X' | b'x') => {}
                Some(b'T') => live += 1,
                Some(_) => {
                    live += 1;
                    all_stopped = false;
                    break;
                }
            }
        }
        if all_stopped {
            // Only zombies left: the process is exiting, nothing to patch.
            if live == 0 && !stale {
                return GroupState::Gone;
            }
            let Some(n) = read_stat(&g.stat, &mut buf).and_then(num_threads) else {
                return GroupState::Gone;
            };
            // Every live thread is one we saw stopped: the whole group is.
            if !stale && n == live {
                return GroupState::Stopped;
            }
            if g.refresh(tgid).is_none() {
                return GroupState::Gone;
            }
        }
        // However the group looks, the wait is bounded: a thread count
        // that never matches (an exiting group) must not hold the agent.
        if Instant::now() > deadline {
            return GroupState::TimedOut;
        }
        if all_stopped {
            continue;
        }
        // The threads we wait for need a CPU to reach their stop; a busy
        // agent on a small node would only delay them. Yield first, then
        // short sleeps, with timer slack at its minimum (set in `run`).
        spins += 1;
        if spins < YIELD_SPINS {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(10));
        }
    }
}

/// The state letter of a /proc stat line; the command name may hold spaces and parentheses.
pub fn proc_state(stat: &[u8]) -> Option<u8> {
    let close = stat.iter().rposition(|&c| c == b')')?;
    stat.get(close + 2).copied()
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    use super::*;

    #[test]
    fn proc_state_survives_odd_comm() {
        assert_eq!(proc_state(b"12 (a) b) c) T 1 2"), Some(b'T'));
        assert_eq!(proc_state(b"12 (python3) S 1"), Some(b'S'));
    }

    #[test]
    fn group_of_a_missing_process_is_gone() {
        let mut g = Groups::default();
        assert_eq!(
            g.wait_stopped(u32::MAX - 1, Duration::from_millis(10)),
            GroupState::Gone
        );
    }

    #[test]
    fn a_running_group_times_out_and_a_stopped_one_is_seen() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut g = Groups::default();
        assert_eq!(
            g.wait_stopped(pid, Duration::from_millis(20)),
            GroupState::TimedOut
        );
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
        assert_eq!(
            g.wait_stopped(pid, Duration::from_secs(2)),
            GroupState::Stopped
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn num_threads_is_field_20() {
        let stat = b"42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 7 0 123 456";
        assert_eq!(num_threads(stat), Some(7));
    }
}
