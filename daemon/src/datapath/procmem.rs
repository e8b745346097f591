//! Reading and patching a stopped process's memory.

use std::fs::OpenOptions;
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;

use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::unistd::Pid;

pub fn read(pid: u32, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let remote = [RemoteIoVec {
        base: addr as usize,
        len,
    }];
    match process_vm_readv(
        Pid::from_raw(pid as i32),
        &mut [IoSliceMut::new(&mut buf)],
        &remote,
    ) {
        Ok(n) if n == len => return Ok(buf),
        _ => {}
    }
    // /proc/PID/mem faults pages in where process_vm_readv gives up.
    let f = OpenOptions::new()
        .read(true)
        .open(format!("/proc/{pid}/mem"))?;
    f.read_exact_at(&mut buf, addr)?;
    Ok(buf)
}

/// Writes `data` at `addr`. Read-only pages (string literals) take the
/// /proc/PID/mem path, which writes through a private copy like a debugger.
pub fn write(pid: u32, addr: u64, data: &[u8]) -> std::io::Result<()> {
    let remote = [RemoteIoVec {
        base: addr as usize,
        len: data.len(),
    }];
    match process_vm_writev(Pid::from_raw(pid as i32), &[IoSlice::new(data)], &remote) {
        Ok(n) if n == data.len() => return Ok(()),
        _ => {}
    }
    let f = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))?;
    f.write_all_at(data, addr)
}
