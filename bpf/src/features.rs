//! Kernel feature probes for `kloak doctor` and the backend choice.

fn helper(
    prog_type: libbpf_sys::bpf_prog_type,
    helper: libbpf_sys::bpf_func_id,
) -> Result<bool, i32> {
    // SAFETY: plain FFI call with a null options pointer, which libbpf accepts.
    let r = unsafe { libbpf_sys::libbpf_probe_bpf_helper(prog_type, helper, std::ptr::null()) };
    if r < 0 { Err(r) } else { Ok(r == 1) }
}

/// Whether the kernel verifier accepts `bpf_loop` in a uprobe program.
pub fn bpf_loop() -> Result<bool, i32> {
    helper(libbpf_sys::BPF_PROG_TYPE_KPROBE, libbpf_sys::BPF_FUNC_loop)
}

/// Whether a uprobe program may call `bpf_probe_write_user`. Kernel
/// lockdown refuses it with a message libbpf's generic helper probe
/// counts as "supported", so this loads a real, valid program instead.
pub fn probe_write_user() -> Result<bool, i32> {
    const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        (code as u64)
            | (((dst | (src << 4)) as u64) << 8)
            | ((off as u16 as u64) << 16)
            | ((imm as u32 as u64) << 32)
    }
    let prog: [u64; 8] = [
        insn(0x7a, 10, 0, -8, 0), // *(u64 *)(r10 - 8) = 0
        insn(0xb7, 1, 0, 0, 0),   // r1 = 0 (destination, never called)
        insn(0xbf, 2, 10, 0, 0),  // r2 = r10
        insn(0x07, 2, 0, 0, -8),  // r2 += -8
        insn(0xb7, 3, 0, 0, 8),   // r3 = 8
        insn(0x85, 0, 0, 0, libbpf_sys::BPF_FUNC_probe_write_user as i32),
        insn(0xb7, 0, 0, 0, 0), // r0 = 0
        insn(0x95, 0, 0, 0, 0), // exit
    ];
    let license = c"GPL";
    // SAFETY: `prog` is 8 valid 8-byte instructions laid out as struct
    // bpf_insn; the license string is NUL-terminated; null opts are allowed.
    let fd = unsafe {
        libbpf_sys::bpf_prog_load(
            libbpf_sys::BPF_PROG_TYPE_KPROBE,
            std::ptr::null(),
            license.as_ptr(),
            prog.as_ptr().cast(),
            prog.len() as _,
            std::ptr::null_mut(),
        )
    };
    if fd >= 0 {
        // SAFETY: bpf_prog_load returned a fresh descriptor we own.
        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        return Ok(true);
    }
    match -fd {
        libc::EINVAL | libc::EACCES | libc::EPERM => Ok(false),
        e => Err(-e),
    }
}

/// Whether a tc program can be attached through TCX (Linux 6.6+), which the
/// wire backend's packet patching needs: loads a program that passes every
/// packet on, links it to loopback's egress for the moment of the probe,
/// and lets both go.
pub fn tcx() -> Result<bool, i32> {
    // By name in this network namespace, not through /sys/class/net: the
    // sysfs a process sees may be another namespace's, or not mounted.
    let lo = nix::net::if_::if_nametoindex("lo").map_err(|e| -(e as i32))? as i32;
    // r0 = TCX_NEXT (-1): hand the packet to whatever comes next.
    probe_link(
        libbpf_sys::BPF_PROG_TYPE_SCHED_CLS,
        -1,
        lo,
        libbpf_sys::BPF_TCX_EGRESS,
        &[libc::EINVAL, libc::EOPNOTSUPP, libc::EPERM],
    )
}

/// Loads the two-instruction program `r0 = ret; exit` of type `prog_type`,
/// links it to `target` at `attach` for the moment of the probe, and lets
/// both go. Ok(false) for a refusal named in `unsupported`.
fn probe_link(
    prog_type: libbpf_sys::bpf_prog_type,
    ret: i32,
    target: i32,
    attach: libbpf_sys::bpf_attach_type,
    unsupported: &[i32],
) -> Result<bool, i32> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const fn insn(code: u8, imm: i32) -> u64 {
        (code as u64) | ((imm as u32 as u64) << 32)
    }
    let prog: [u64; 2] = [insn(0xb7, ret), insn(0x95, 0)];
    let license = c"GPL";
    // SAFETY: `prog` is 2 valid instructions laid out as struct bpf_insn;
    // the license string is NUL-terminated; null opts are allowed.
    let fd = unsafe {
        libbpf_sys::bpf_prog_load(
            prog_type,
            std::ptr::null(),
            license.as_ptr(),
            prog.as_ptr().cast(),
            prog.len() as _,
            std::ptr::null_mut(),
        )
    };
    if fd < 0 {
        return Err(fd);
    }
    // SAFETY: bpf_prog_load returned a fresh descriptor we own.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a valid program descriptor, a target the caller opened or
    // named, and null opts, which libbpf accepts.
    let link = unsafe {
        libbpf_sys::bpf_link_create(prog_fd.as_raw_fd(), target, attach, std::ptr::null())
    };
    if link >= 0 {
        // SAFETY: bpf_link_create returned a fresh descriptor we own.
        drop(unsafe { OwnedFd::from_raw_fd(link) });
        return Ok(true);
    }
    if unsupported.contains(&-link) {
        Ok(false)
    } else {
        Err(link)
    }
}

pub fn send_signal_thread() -> Result<bool, i32> {
    helper(
        libbpf_sys::BPF_PROG_TYPE_KPROBE,
        libbpf_sys::BPF_FUNC_send_signal_thread,
    )
}

pub fn ringbuf() -> Result<bool, i32> {
    // SAFETY: plain FFI call with a null options pointer.
    let r = unsafe {
        libbpf_sys::libbpf_probe_bpf_map_type(libbpf_sys::BPF_MAP_TYPE_RINGBUF, std::ptr::null())
    };
    if r < 0 { Err(r) } else { Ok(r == 1) }
}

/// Whether a cgroup_skb program attaches to the cgroup at `root` (the DNS
/// packet path): loads a program that passes every packet, links it to the
/// root's ingress for the moment of the probe, and lets both go.
pub fn cgroup_skb(root: &std::path::Path) -> Result<bool, i32> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(root).map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO))?;
    // r0 = 1: pass.
    probe_link(
        libbpf_sys::BPF_PROG_TYPE_CGROUP_SKB,
        1,
        dir.as_raw_fd(),
        libbpf_sys::BPF_CGROUP_INET_INGRESS,
        &[libc::EINVAL, libc::EOPNOTSUPP, libc::EPERM, libc::EBADF],
    )
}
