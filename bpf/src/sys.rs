//! The few process-level operations that need `unsafe`, kept here so the
//! rest of the workspace has none.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd`'s child join a cgroup before it execs, so its first
/// instruction already runs tracked. `procs` is the cgroup's opened
/// `cgroup.procs`; it must stay open until the child is spawned.
pub fn spawn_into_cgroup(cmd: &mut Command, procs: &File) {
    let fd = procs.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only calls write(2),
    // which is async-signal-safe, on a descriptor inherited from the parent.
    unsafe {
        cmd.pre_exec(move || {
            let pid = b"0";
            if libc::write(fd, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
