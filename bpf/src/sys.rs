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

/// A handle on a process that stays valid (and names that process only)
/// however its pid is reused later.
pub struct ProcessHandle(std::os::fd::OwnedFd);

impl ProcessHandle {
    /// pidfd_open(2): Linux 5.3 and later.
    pub fn open(pid: u32) -> std::io::Result<ProcessHandle> {
        // SAFETY: a plain syscall with integer arguments; on success it
        // returns a new descriptor that nothing else owns.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor returned to us above.
        Ok(ProcessHandle(unsafe {
            std::os::fd::FromRawFd::from_raw_fd(fd as i32)
        }))
    }

    /// The address the process's socket `fd` is connected to: the socket
    /// borrowed with pidfd_getfd(2) (Linux 5.6; needs the ptrace access the
    /// agent has anyway), asked, and let go. `Ok(None)` for a descriptor
    /// that is not a connected socket.
    pub fn socket_peer(&self, fd: i32) -> std::io::Result<Option<std::net::SocketAddr>> {
        // SAFETY: integer arguments only; the result is a new descriptor.
        let ours = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.0.as_raw_fd(), fd, 0) };
        if ours < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `ours` is a fresh descriptor we own from here on.
        let ours: std::os::fd::OwnedFd =
            unsafe { std::os::fd::FromRawFd::from_raw_fd(ours as i32) };
        use nix::sys::socket::{SockaddrLike, SockaddrStorage, getpeername};
        let Ok(addr) = getpeername::<SockaddrStorage>(ours.as_raw_fd()) else {
            return Ok(None);
        };
        Ok(match addr.family() {
            Some(nix::sys::socket::AddressFamily::Inet) => addr
                .as_sockaddr_in()
                .map(|a| std::net::SocketAddr::V4((*a).into())),
            Some(nix::sys::socket::AddressFamily::Inet6) => addr
                .as_sockaddr_in6()
                .map(|a| std::net::SocketAddr::V6((*a).into())),
            _ => None,
        })
    }
}
