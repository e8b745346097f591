//! Which processes the kernel follows and which files carry probes:
//! tracking container cgroups (or, on cgroup v1, their pids), attaching to
//! the TLS write functions of every executable file a tracked process maps,
//! and dropping those probes when a file's last user is gone.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kloak_bpf::Probes;
use libbpf_rs::Link;

use crate::datapath::cgroup::Cgroup;
use crate::datapath::discover;
use crate::datapath::guardian::{self, Guardian};
use crate::datapath::record::{Counters, inc};

/// How often, at most, the agent looks for files that lost their last user.
const GC_EVERY: Duration = Duration::from_millis(100);
/// How often pid-tracked groups are re-read for processes that appeared
/// between a read of cgroup.procs and their parent's entry in the map.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

enum FileState {
    NotTls,
    Tls(#[allow(dead_code)] Vec<Link>),
}

pub struct Attacher {
    files: HashMap<(u64, u64), FileState>,
    /// cgroup directories of the tracked processes, for finding a file's users.
    cgroups: Vec<PathBuf>,
    gc_pending: bool,
    last_gc: Instant,
    /// Container cgroups the controller asked for, by id.
    tracked: HashMap<u64, PathBuf>,
    /// The pid-tracked ones among them.
    by_pid: HashMap<u64, PathBuf>,
    last_rescan: Instant,
    guardian: Option<Guardian>,
}

impl Attacher {
    /// `cgroups`: directories tracked from the start (`kloak run`'s own).
    pub fn new(cgroups: Vec<PathBuf>, guardian: Option<Guardian>) -> Self {
        Attacher {
            files: HashMap::new(),
            cgroups,
            gc_pending: false,
            last_gc: Instant::now(),
            tracked: HashMap::new(),
            by_pid: HashMap::new(),
            last_rescan: Instant::now(),
            guardian,
        }
    }

    /// The guardian, handed back so that it outlives the probes.
    pub fn take_guardian(&mut self) -> Option<Guardian> {
        self.guardian.take()
    }

    /// Starts following a container's processes. Processes already running
    /// mapped their TLS libraries before tracking began; later ones stop on
    /// exec/mmap and come back through [`Attacher::discover`].
    pub fn track(&mut self, probes: &Probes, c: &Counters, cgroup: PathBuf, id: u64, by_pid: bool) {
        let Ok(cg) = Cgroup::open(&cgroup) else {
            tracing::warn!(cgroup = %cgroup.display(), "container cgroup vanished before tracking");
            return;
        };
        // A predecessor that died with its guardian may have left a process
        // stopped; nothing of ours can be stopped yet.
        let continued = guardian::sweep(&cg);
        if continued > 0 {
            tracing::warn!(cgroup = %cgroup.display(), continued, "continued processes an earlier agent left stopped");
        }
        if let Some(g) = &mut self.guardian {
            g.watch(&cgroup, true);
        }
        let r = if by_pid {
            self.by_pid.insert(id, cgroup.clone());
            // Twice: a process forked by one not yet in the map when the
            // first read ran shows up in the second.
            (0..2).try_for_each(|_| {
                cg.pids()
                    .into_iter()
                    .try_for_each(|pid| probes.track_pid(pid, id))
            })
        } else {
            probes.track_cgroup(id)
        };
        if let Err(e) = r {
            tracing::warn!(cgroup = %cgroup.display(), error = %e, "tracking the container failed");
            return;
        }
        for pid in cg.pids() {
            self.discover_pid(probes, c, pid, None);
        }
        self.cgroups.push(cgroup.clone());
        self.tracked.insert(id, cgroup);
    }

    pub fn untrack(&mut self, probes: &Probes, id: u64) {
        if self.by_pid.remove(&id).is_some() {
            probes.untrack_pids(id);
        } else {
            probes.untrack_cgroup(id);
        }
        if let Some(path) = self.tracked.remove(&id) {
            if let Some(g) = &mut self.guardian {
                g.watch(&path, false);
            }
            self.cgroups.retain(|p| *p != path);
        }
        self.gc_pending = true;
    }

    /// A tracked process exited: a file may have lost its last user.
    pub fn process_exited(&mut self) {
        self.gc_pending = true;
    }

    /// Housekeeping between batches: re-reads pid-tracked groups and drops
    /// the probes of unused files, each at its own pace.
    pub fn tick(&mut self, probes: &Probes, c: &Counters) {
        if !self.by_pid.is_empty() && self.last_rescan.elapsed() >= RESCAN_EVERY {
            self.rescan_pid_groups(probes);
        }
        if self.gc_pending && self.last_gc.elapsed() >= GC_EVERY {
            self.collect_unused_files(probes, c);
        }
    }

    /// Processes in the tracked containers now, for the metrics.
    pub fn tracked_processes(&self) -> u64 {
        self.tracked
            .values()
            .filter_map(|cg| std::fs::read_to_string(cg.join("cgroup.procs")).ok())
            .map(|s| s.lines().count() as u64)
            .sum()
    }

    fn rescan_pid_groups(&mut self, probes: &Probes) {
        self.last_rescan = Instant::now();
        for (&id, path) in &self.by_pid {
            if let Ok(cg) = Cgroup::open(path) {
                for pid in cg.pids() {
                    let _ = probes.track_pid(pid, id);
                }
            }
        }
    }

    /// Executable files any tracked process maps now.
    fn files_in_use(&self) -> HashSet<(u64, u64)> {
        let mut used = HashSet::new();
        for dir in &self.cgroups {
            let Ok(cg) = Cgroup::open(dir) else {
                continue;
            };
            for pid in cg.pids() {
                for m in discover::read_maps(pid)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|m| m.exec)
                {
                    used.insert((m.dev, m.ino));
                }
            }
        }
        used
    }

    /// Drops the probes of files no tracked process maps any more. The inode
    /// is forgotten first and the maps read again after, so a process that
    /// maps the file in between either shows up in the second read or stops
    /// on its mapping and gets the file attached anew.
    fn collect_unused_files(&mut self, probes: &Probes, c: &Counters) {
        self.gc_pending = false;
        self.last_gc = Instant::now();
        let used = self.files_in_use();
        let unused: Vec<(u64, u64)> = self
            .files
            .keys()
            .filter(|k| !used.contains(k))
            .copied()
            .collect();
        if unused.is_empty() {
            return;
        }
        for &(dev, ino) in &unused {
            probes.forget_inode(dev, ino);
        }
        let used = self.files_in_use();
        for key in unused {
            if used.contains(&key) {
                let _ = probes.mark_inode_known(key.0, key.1);
                continue;
            }
            if let Some(FileState::Tls(_)) = self.files.remove(&key) {
                inc(&c.detached_files);
                tracing::info!(
                    dev = key.0,
                    inode = key.1,
                    "last user gone: TLS probes detached"
                );
            }
        }
    }

    /// A tracked process exec'd or mapped a new executable file (`mapped`:
    /// the file's device and inode as the kernel keyed it): attach to any
    /// TLS write function in what it now maps.
    pub fn discover_pid(
        &mut self,
        probes: &Probes,
        c: &Counters,
        tgid: u32,
        mapped: Option<(u64, u64)>,
    ) {
        let maps = match discover::read_maps(tgid) {
            Ok(m) => m,
            Err(err) => {
                tracing::debug!(pid = tgid, error = %err, "process went away before its maps were read");
                return;
            }
        };
        for m in maps.iter().filter(|m| m.exec) {
            let key = (m.dev, m.ino);
            if self.files.contains_key(&key) {
                continue;
            }
            let path = m.open_path(tgid);
            let state = match discover::tls_library(&path) {
                Ok(lib) if lib.is_empty() => FileState::NotTls,
                Ok(lib) => {
                    let fns = &lib.writes;
                    let mut links = Vec::new();
                    match probes.attach_socket_hooks(&path, &lib.sockets) {
                        Ok(l) => links.extend(l),
                        Err(err) => {
                            inc(&c.attach_errors);
                            tracing::warn!(file = %m.path, error = %err, "attaching the socket hooks failed; writes through it will be blocked");
                        }
                    }
                    for f in fns {
                        match probes.attach_tls_write(
                            &path,
                            f.file_offset as usize,
                            f.abi,
                            lib.keys,
                        ) {
                            Ok(l) => links.extend(l),
                            Err(err) => {
                                inc(&c.attach_errors);
                                tracing::warn!(file = %m.path, error = %err, "attaching failed");
                            }
                        }
                    }
                    inc(&c.attached_files);
                    tracing::info!(file = %m.path, functions = ?fns.iter().map(|f| f.abi.function()).collect::<Vec<_>>(), "attached to TLS library");
                    FileState::Tls(links)
                }
                Err(err) => {
                    tracing::debug!(file = %m.path, error = %err, "not an ELF we can read");
                    FileState::NotTls
                }
            };
            self.files.insert(key, state);
            let _ = probes.mark_inode_known(m.dev, m.ino);
        }
        if let Some((dev, ino)) = mapped {
            // The kernel keyed the file by the inode the fd named; under
            // overlayfs that can differ from the mapping's. Either way, done.
            let _ = probes.mark_inode_known(dev, ino);
        }
    }
}
