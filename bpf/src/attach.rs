//! The uprobes on TLS libraries: write functions, and the functions that
//! tell which socket a TLS object writes to.

use std::path::Path;

use libbpf_rs::{Link, UprobeOpts};

use crate::types::{fd_arg, write_abi};
use crate::{Backend, Error, Probes, Result};

/// The TLS write function a uprobe sits on; it fixes the argument registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAbi {
    SslWrite,
    SslWriteEx,
    GoTlsWrite,
    /// `gnutls_record_send2` (which `gnutls_record_send` jumps to).
    GnutlsSend,
    /// `<rustls::conn::connection::Writer as std::io::Write>::write`: Rust's
    /// ABI for `(&mut self, &[u8]) -> io::Result<usize>` puts the slice in RSI/RDX.
    RustlsWrite,
}

impl WriteAbi {
    pub(crate) fn cookie(self) -> u64 {
        let abi = match self {
            WriteAbi::SslWrite => write_abi::ABI_SSL_WRITE,
            WriteAbi::SslWriteEx => write_abi::ABI_SSL_WRITE_EX,
            WriteAbi::GoTlsWrite => write_abi::ABI_GO_TLS_WRITE,
            WriteAbi::GnutlsSend => write_abi::ABI_GNUTLS_SEND,
            WriteAbi::RustlsWrite => write_abi::ABI_RUSTLS_WRITE,
        };
        u64::from(abi.0)
    }

    pub(crate) fn from_cookie(c: u64) -> Option<Self> {
        let abi = (c & u64::from(write_abi::ABI_MASK.0)) as u32;
        match write_abi(abi) {
            write_abi::ABI_SSL_WRITE => Some(WriteAbi::SslWrite),
            write_abi::ABI_SSL_WRITE_EX => Some(WriteAbi::SslWriteEx),
            write_abi::ABI_GO_TLS_WRITE => Some(WriteAbi::GoTlsWrite),
            write_abi::ABI_GNUTLS_SEND => Some(WriteAbi::GnutlsSend),
            write_abi::ABI_RUSTLS_WRITE => Some(WriteAbi::RustlsWrite),
            _ => None,
        }
    }

    pub fn function(self) -> &'static str {
        match self {
            WriteAbi::SslWrite => "SSL_write",
            WriteAbi::SslWriteEx => "SSL_write_ex",
            WriteAbi::GoTlsWrite => "crypto/tls.(*Conn).Write",
            WriteAbi::GnutlsSend => "gnutls_record_send",
            WriteAbi::RustlsWrite => "<rustls::conn::connection::Writer as std::io::Write>::write",
        }
    }

    /// The TLS implementation the function belongs to.
    pub fn library(self) -> &'static str {
        match self {
            WriteAbi::SslWrite | WriteAbi::SslWriteEx => "openssl",
            WriteAbi::GoTlsWrite => "go-crypto-tls",
            WriteAbi::GnutlsSend => "gnutls",
            WriteAbi::RustlsWrite => "rustls",
        }
    }

    /// Go moves goroutine stacks, so a uretprobe's return-address trampoline corrupts them.
    pub fn supports_return_probe(self) -> bool {
        !matches!(self, WriteAbi::GoTlsWrite)
    }
}

/// File offsets of the functions that bind an `SSL*` to a socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketHooks {
    /// Functions `(tls object, …, fd)` that bind a socket: `SSL_set_fd`
    /// (Python's `ssl`; fd in RSI), GnuTLS's transport setters (fd in RSI or,
    /// for the two-sided ones, the sending fd in RDX).
    pub fd_setters: Vec<(usize, FdArg)>,
    /// `SSL_set_bio(ssl, rbio, wbio)`, with `BIO_new_socket(fd)` naming the BIO's fd.
    pub set_bio: Option<usize>,
    pub bio_new_socket: Option<usize>,
    /// `SSL_connect`/`SSL_do_handshake`: the thread's first socket write during
    /// them names the fd (curl's own BIO).
    pub handshakes: Vec<usize>,
    /// libcrypto's `EVP_KDF_derive`: derives every TLS key (wire backend).
    pub kdf: Option<usize>,
    /// `SSL_free`: the end of an object's key material (wire backend).
    pub free: Option<usize>,
    /// Go `crypto/tls`: where the wire backend learns a `*tls.Conn`'s keys.
    pub go_keys: Option<GoKeyHooks>,
}

/// File offsets of the Go `crypto/tls` functions the wire backend's key
/// route probes. All or none: a route with a function missing could
/// attribute a key to the wrong connection, so it is not attached at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoKeyHooks {
    /// `(*Conn).clientHandshake`, `serverHandshake` (those the binary
    /// has) and `handleKeyUpdate`: which `*Conn` a goroutine sets keys for.
    /// (Its Write probe says which one it writes to.)
    pub handshakes: Vec<usize>,
    /// `(*halfConn).setTrafficSecret` (TLS 1.3 and KeyUpdate).
    pub set_secret: usize,
    /// `aeadAESGCMTLS13`, `aeadAESGCM`, `aeadChaCha20Poly1305`.
    pub aeads: [usize; 3],
    /// `(*halfConn).encrypt`: one call per record, sending side only.
    pub encrypt: usize,
    /// `(*Conn).Close`: the end of the connection's keys.
    pub close: usize,
}

/// Which argument register of an fd setter holds the (sending) fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdArg {
    Rsi,
    Rdx,
}

impl FdArg {
    pub(crate) fn cookie(self) -> u64 {
        let arg = match self {
            FdArg::Rsi => fd_arg::FD_ARG_RSI,
            FdArg::Rdx => fd_arg::FD_ARG_RDX,
        };
        u64::from(arg.0)
    }
}

impl SocketHooks {
    pub fn is_empty(&self) -> bool {
        *self == SocketHooks::default()
    }
}

impl Probes {
    /// Attaches the write probes (and, where the ABI allows and scrub is on,
    /// the return probe) to `func_offset` in `binary`, for every process;
    /// the programs themselves filter by cgroup. `keys`: the library's TLS
    /// keys are learned (OpenSSL 3: its libcrypto's `EVP_KDF_derive`), so a
    /// write that starts before its handshake has ended can wait for them
    /// on the wire.
    pub fn attach_tls_write(
        &self,
        binary: &Path,
        func_offset: usize,
        abi: WriteAbi,
        keys: bool,
    ) -> Result<Vec<Link>> {
        let cookie = abi.cookie()
            | if keys && matches!(abi, WriteAbi::SslWrite | WriteAbi::SslWriteEx) {
                u64::from(write_abi::ABI_KEYS.0)
            } else {
                0
            };
        let what = |ret: bool| {
            format!(
                "{} {} at {}+{:#x}",
                if ret { "uretprobe" } else { "uprobe" },
                abi.function(),
                binary.display(),
                func_offset
            )
        };
        let mut links = Vec::with_capacity(2);
        let opts = UprobeOpts {
            cookie,
            retprobe: false,
            ..Default::default()
        };
        links.push(
            self.skel
                .progs
                .tls_write_enter
                .attach_uprobe_with_opts(-1, binary, func_offset, opts)
                .map_err(|source| Error::Attach {
                    what: what(false),
                    source,
                })?,
        );
        if self.scrub && abi.supports_return_probe() {
            // The wire backend's fallback is the pause backend, scrub included.
            let prog = match self.backend {
                Backend::Pause | Backend::Wire => &self.skel.progs.tls_write_return_pause,
                Backend::InPlace => &self.skel.progs.tls_write_return_inplace,
            };
            let opts = UprobeOpts {
                cookie,
                retprobe: true,
                ..Default::default()
            };
            links.push(
                prog.attach_uprobe_with_opts(-1, binary, func_offset, opts)
                    .map_err(|source| Error::Attach {
                        what: what(true),
                        source,
                    })?,
            );
        }
        Ok(links)
    }

    /// Attaches the hooks that tell which socket an SSL* writes to.
    pub fn attach_socket_hooks(&self, binary: &Path, hooks: &SocketHooks) -> Result<Vec<Link>> {
        let mut links = Vec::new();
        let attach = |prog: &libbpf_rs::ProgramMut<'_>, off: usize, ret: bool, what: &str| {
            prog.attach_uprobe_with_opts(
                -1,
                binary,
                off,
                UprobeOpts {
                    retprobe: ret,
                    ..Default::default()
                },
            )
            .map_err(|source| Error::Attach {
                what: format!("{what} at {}+{off:#x}", binary.display()),
                source,
            })
        };
        let p = &self.skel.progs;
        for &(off, arg) in &hooks.fd_setters {
            let opts = UprobeOpts {
                cookie: arg.cookie(),
                ..Default::default()
            };
            links.push(
                p.ssl_set_fd
                    .attach_uprobe_with_opts(-1, binary, off, opts)
                    .map_err(|source| Error::Attach {
                        what: format!("fd setter at {}+{off:#x}", binary.display()),
                        source,
                    })?,
            );
        }
        if let Some(off) = hooks.set_bio {
            links.push(attach(&p.ssl_set_bio, off, false, "SSL_set_bio")?);
        }
        if let Some(off) = hooks.bio_new_socket {
            links.push(attach(
                &p.bio_new_socket_enter,
                off,
                false,
                "BIO_new_socket",
            )?);
            links.push(attach(
                &p.bio_new_socket_exit,
                off,
                true,
                "BIO_new_socket return",
            )?);
        }
        if let Some(off) = hooks.kdf
            && self.backend == Backend::Wire
        {
            links.push(attach(&p.kdf_enter, off, false, "EVP_KDF_derive")?);
            links.push(attach(&p.kdf_exit, off, true, "EVP_KDF_derive return")?);
        }
        if let Some(off) = hooks.free
            && self.backend == Backend::Wire
        {
            links.push(attach(&p.ssl_free_enter, off, false, "SSL_free")?);
        }
        if let Some(g) = &hooks.go_keys
            && self.backend == Backend::Wire
        {
            for &off in &g.handshakes {
                links.push(attach(
                    &p.go_handshake_enter,
                    off,
                    false,
                    "crypto/tls handshake or KeyUpdate",
                )?);
            }
            links.push(attach(
                &p.go_set_secret,
                g.set_secret,
                false,
                "crypto/tls.(*halfConn).setTrafficSecret",
            )?);
            for &off in &g.aeads {
                links.push(attach(
                    &p.go_aead,
                    off,
                    false,
                    "crypto/tls AEAD constructor",
                )?);
            }
            links.push(attach(
                &p.go_encrypt,
                g.encrypt,
                false,
                "crypto/tls.(*halfConn).encrypt",
            )?);
            links.push(attach(
                &p.go_close_enter,
                g.close,
                false,
                "crypto/tls.(*Conn).Close",
            )?);
        }
        for &off in &hooks.handshakes {
            links.push(attach(&p.ssl_handshake_enter, off, false, "handshake")?);
            links.push(attach(
                &p.ssl_handshake_exit,
                off,
                true,
                "handshake return",
            )?);
        }
        Ok(links)
    }
}

/// Which way a device's packets go past a tc program, and what it does there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireHook {
    /// Patches and learns suites (tcx egress: a host device's way out).
    EgressPatch,
    /// Patches and learns suites (tcx ingress: a pod veth's host side).
    IngressPatch,
    /// Learns suites from ServerHellos only.
    EgressLearn,
    IngressLearn,
}

impl Probes {
    /// Attaches a wire backend tc program to device `ifindex` with TCX.
    /// The link detaches when dropped.
    pub fn attach_wire(&self, ifindex: u32, hook: WireHook) -> Result<Link> {
        use libbpf_rs::AsRawLibbpf;
        let p = &self.skel.progs;
        let prog = match hook {
            WireHook::EgressPatch => &p.wire_out_patch,
            WireHook::IngressPatch => &p.wire_in_patch,
            WireHook::EgressLearn => &p.wire_out_learn,
            WireHook::IngressLearn => &p.wire_in_learn,
        };
        let what = || format!("tcx {hook:?} on ifindex {ifindex}");
        // First on the device: every Kloak program passes packets on to
        // the next (TCX_NEXT), but another program before it (an older
        // Kloak, anyone's) may end the chain and hide the packets from it.
        let opts = libbpf_sys::bpf_tcx_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_tcx_opts>() as _,
            flags: libbpf_sys::BPF_F_BEFORE,
            ..Default::default()
        };
        // SAFETY: the program outlives this call (the skeleton owns it), and
        // libbpf returns either a new link we then own or NULL with errno set.
        let ptr = unsafe {
            libbpf_sys::bpf_program__attach_tcx(
                prog.as_libbpf_object().as_ptr(),
                ifindex as i32,
                &opts,
            )
        };
        let ptr = std::ptr::NonNull::new(ptr).ok_or_else(|| Error::Attach {
            what: what(),
            source: libbpf_rs::Error::from(std::io::Error::last_os_error()),
        })?;
        // SAFETY: ptr is a valid link libbpf handed over to us.
        Ok(unsafe { Link::from_ptr(ptr) })
    }
}
