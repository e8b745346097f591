//! The cgroup v2 directory a standalone run puts its command in. The BPF
//! programs recognise tracked processes by this cgroup's id.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); Kloak tracks processes by cgroup v2 id"
    )]
    NoCgroup2,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where cgroup2 is mounted: /sys/fs/cgroup on unified hosts,
/// /sys/fs/cgroup/unified on hybrid ones.
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Io {
            what: "reading",
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split_ascii_whitespace().nth(4)?;
            (post.split_ascii_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .min_by_key(|p| p.components().count())
        .ok_or(CgroupError::NoCgroup2)
}

#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    pub id: u64,
}

impl Cgroup {
    /// Creates `<cgroup2>/kloak/<name>`.
    pub fn create(name: &str) -> Result<Cgroup, CgroupError> {
        let path = cgroup2_root()?.join("kloak").join(name);
        std::fs::create_dir_all(&path).map_err(|source| CgroupError::Io {
            what: "creating cgroup",
            path: path.clone(),
            source,
        })?;
        Cgroup::open(&path)
    }

    pub fn open(path: &Path) -> Result<Cgroup, CgroupError> {
        let md = std::fs::metadata(path).map_err(|source| CgroupError::Io {
            what: "reading cgroup",
            path: path.to_path_buf(),
            source,
        })?;
        // The kernfs inode number is what bpf_get_current_cgroup_id() returns.
        Ok(Cgroup {
            path: path.to_path_buf(),
            id: md.ino(),
        })
    }

    pub fn procs_file(&self) -> Result<File, CgroupError> {
        let p = self.path.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|source| CgroupError::Io {
                what: "opening",
                path: p,
                source,
            })
    }

    /// Every process in this cgroup and below.
    pub fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        collect_pids(&self.path, &mut out);
        out
    }

    /// Removes the directory if nothing lives in it any more.
    pub fn remove_if_empty(&self) -> bool {
        self.pids().is_empty() && std::fs::remove_dir(&self.path).is_ok()
    }
}

/// Cgroups of earlier `kloak run`s whose agent is gone: `(path, agent pid)`.
/// A guardian normally cleans these up; if it died too, they are found here.
pub fn stale_runs() -> Vec<Cgroup> {
    let Ok(root) = cgroup2_root() else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir(root.join("kloak")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|d| {
            let name = d.file_name().into_string().ok()?;
            let pid: u32 = name.strip_prefix("run-")?.parse().ok()?;
            let alive = std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| {
                e.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("kloak"))
            });
            (!alive).then(|| Cgroup::open(&d.path()).ok()).flatten()
        })
        .collect()
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for d in rd.flatten() {
            if d.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&d.path(), out);
            }
        }
    }
}
