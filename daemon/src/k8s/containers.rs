//! From a pod's `status.containerStatuses[].containerID` to the cgroup its
//! processes live in. Runtimes and cgroup drivers name the directory
//! differently, so the hierarchy is searched for any of the known names:
//!
//! | runtime    | systemd driver                      | cgroupfs driver                 |
//! |------------|-------------------------------------|---------------------------------|
//! | containerd | `…/kubepods-…-pod<uid>.slice/cri-containerd-<id>.scope` | `…/kubepods/…/pod<uid>/<id>` |
//! | CRI-O      | `…/crio-<id>.scope`                 | `…/pod<uid>/crio-<id>`          |
//! | Docker     | `…/docker-<id>.scope`               | `…/pod<uid>/<id>`               |
//!
//! On cgroup v2 and hybrid hosts the unified hierarchy is searched (its
//! directory's inode is the id the BPF programs see); on v1-only hosts a
//! controller hierarchy is, which gives the processes but no cgroup id, so
//! the agent tracks those by pid and the kernel follows their forks.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContainerError {
    #[error("container ID {0:?} is not <runtime>://<hex id>")]
    BadId(String),
}

/// A container ID as the kubelet reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId {
    pub runtime: String,
    pub id: String,
}

impl ContainerId {
    pub fn parse(raw: &str) -> Result<ContainerId, ContainerError> {
        let (runtime, id) = raw
            .split_once("://")
            .ok_or_else(|| ContainerError::BadId(raw.into()))?;
        if runtime.is_empty() || id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ContainerError::BadId(raw.into()));
        }
        Ok(ContainerId {
            runtime: runtime.into(),
            id: id.to_ascii_lowercase(),
        })
    }

    /// Directory names this container's cgroup may have.
    fn names(&self) -> [String; 5] {
        let id = &self.id;
        [
            id.clone(),
            format!("cri-containerd-{id}.scope"),
            format!("crio-{id}.scope"),
            format!("crio-{id}"),
            format!("docker-{id}.scope"),
        ]
    }
}

/// How cgroups are mounted on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The unified (v2) hierarchy: `/sys/fs/cgroup` on v2 hosts,
    /// `/sys/fs/cgroup/unified` on hybrid ones.
    pub unified: Option<PathBuf>,
    /// A v1 hierarchy with processes in it (pids, memory, cpu or systemd).
    pub v1: Option<PathBuf>,
}

impl Layout {
    /// Reads the layout from a mountinfo text.
    pub fn from_mountinfo(text: &str) -> Layout {
        let mut unified: Option<PathBuf> = None;
        let mut v1: Vec<(usize, PathBuf)> = Vec::new();
        for l in text.lines() {
            let Some((pre, post)) = l.split_once(" - ") else {
                continue;
            };
            let Some(mp) = pre.split_ascii_whitespace().nth(4) else {
                continue;
            };
            let mut post = post.split_ascii_whitespace();
            let fstype = post.next().unwrap_or("");
            let opts = post.nth(1).unwrap_or("");
            match fstype {
                "cgroup2" => {
                    let p = PathBuf::from(mp);
                    if unified
                        .as_ref()
                        .is_none_or(|u| p.components().count() < u.components().count())
                    {
                        unified = Some(p);
                    }
                }
                "cgroup" => {
                    // Prefer hierarchies every container gets a directory in.
                    let rank = ["pids", "memory", "cpu", "name=systemd"]
                        .iter()
                        .position(|c| opts.split(',').any(|o| o == *c));
                    if let Some(r) = rank {
                        v1.push((r, PathBuf::from(mp)));
                    }
                }
                _ => {}
            }
        }
        v1.sort();
        Layout {
            unified,
            v1: v1.into_iter().next().map(|(_, p)| p),
        }
    }

    pub fn detect() -> std::io::Result<Layout> {
        Ok(Layout::from_mountinfo(&std::fs::read_to_string(
            "/proc/self/mountinfo",
        )?))
    }

    /// Re-roots the layout under `root` (a host's /sys/fs/cgroup mounted
    /// somewhere else in the agent's container).
    pub fn rooted(self, host_mount: &Path, local: &Path) -> Layout {
        let map = |p: PathBuf| match p.strip_prefix(host_mount) {
            Ok(rest) => local.join(rest),
            Err(_) => p,
        };
        Layout {
            unified: self.unified.map(map),
            v1: self.v1.map(map),
        }
    }
}

/// Where a container's processes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Directory in the unified hierarchy; its inode is the cgroup id.
    pub unified: Option<PathBuf>,
    /// Directory in a v1 hierarchy (v1-only hosts).
    pub v1: Option<PathBuf>,
}

/// Searches the hierarchies for `c`'s cgroup. Depth-limited: kubepods trees
/// are at most a handful of levels deep under any driver.
pub fn find(layout: &Layout, c: &ContainerId) -> Option<Found> {
    let names = c.names();
    let unified = layout.unified.as_ref().and_then(|r| search(r, &names, 8));
    let v1 = if unified.is_none() {
        layout.v1.as_ref().and_then(|r| search(r, &names, 8))
    } else {
        None
    };
    (unified.is_some() || v1.is_some()).then_some(Found { unified, v1 })
}

fn search(root: &Path, names: &[String], depth: usize) -> Option<PathBuf> {
    let mut level = vec![root.to_path_buf()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in level {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for ent in rd.flatten() {
                if !ent.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = ent.file_name();
                let name = name.to_string_lossy();
                if names.iter().any(|n| *n == name) {
                    return Some(ent.path());
                }
                next.push(ent.path());
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f9a2b7c1d3e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeef";

    #[test]
    fn container_ids_parse_and_bad_ones_are_named() {
        let c = ContainerId::parse(&format!("containerd://{ID}")).unwrap();
        assert_eq!(c.runtime, "containerd");
        assert_eq!(c.id, ID);
        assert!(ContainerId::parse(&format!("cri-o://{ID}")).is_ok());
        for bad in [
            "",
            "containerd://",
            "abc",
            "containerd://xyz-not-hex-at-all",
        ] {
            let e = ContainerId::parse(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn layouts_from_mountinfo() {
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Layout::from_mountinfo(v2),
            Layout {
                unified: Some("/sys/fs/cgroup".into()),
                v1: None
            }
        );
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n\
            26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n\
            27 25 0:24 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n\
            31 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
            33 25 0:30 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let l = Layout::from_mountinfo(hybrid);
        assert_eq!(
            l.unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(l.v1.as_deref(), Some(Path::new("/sys/fs/cgroup/pids")));
        let v1 = "31 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
            32 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let l = Layout::from_mountinfo(v1);
        assert_eq!(l.unified, None);
        assert_eq!(l.v1.as_deref(), Some(Path::new("/sys/fs/cgroup/memory")));
    }

    #[test]
    fn every_runtime_and_driver_naming_is_found() {
        let uid = "0d5c0d8e-1b2a-4c3d-9e8f-001122334455";
        let uid_ = uid.replace('-', "_");
        let cases = [
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
            ),
            format!("kubepods/burstable/pod{uid}/{ID}"),
            format!("kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"),
            format!("kubepods/besteffort/pod{uid}/crio-{ID}"),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/docker-{ID}.scope"
            ),
        ];
        for rel in cases {
            let t = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(t.path().join("system.slice/other.scope")).unwrap();
            std::fs::create_dir_all(t.path().join(&rel)).unwrap();
            let layout = Layout {
                unified: Some(t.path().into()),
                v1: None,
            };
            let c = ContainerId::parse(&format!("containerd://{ID}")).unwrap();
            let f = find(&layout, &c).unwrap_or_else(|| panic!("not found: {rel}"));
            assert_eq!(f.unified.unwrap(), t.path().join(&rel));
            // v1-only hosts: found in the controller hierarchy instead.
            let layout = Layout {
                unified: None,
                v1: Some(t.path().into()),
            };
            assert_eq!(find(&layout, &c).unwrap().v1.unwrap(), t.path().join(&rel));
        }
        let t = tempfile::tempdir().unwrap();
        let layout = Layout {
            unified: Some(t.path().into()),
            v1: None,
        };
        let c = ContainerId::parse(&format!("containerd://{ID}")).unwrap();
        assert_eq!(find(&layout, &c), None);
    }
}
