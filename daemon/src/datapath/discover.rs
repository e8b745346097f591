//! Finding TLS write functions in the files a process maps.

use std::path::{Path, PathBuf};

use kloak_bpf::{FdArg, GoKeyHooks, SocketHooks, WriteAbi};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing ELF {path}: {source}")]
    Elf {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub exec: bool,
    /// Kernel dev_t encoding (major << 20 | minor), as BPF sees it.
    pub dev: u64,
    pub ino: u64,
    pub path: String,
}

impl Mapping {
    /// A path that opens this very file from outside the process's mount namespace.
    pub fn open_path(&self, pid: u32) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            self.start, self.end
        ))
    }
}

pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut f = line.split_ascii_whitespace();
    let range = f.next()?;
    let perms = f.next()?;
    let _offset = f.next()?;
    let dev = f.next()?;
    let ino: u64 = f.next()?.parse().ok()?;
    let path = f.collect::<Vec<_>>().join(" ");
    if ino == 0 || !path.starts_with('/') {
        return None;
    }
    let (s, e) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    let maj = u64::from_str_radix(maj, 16).ok()?;
    let min = u64::from_str_radix(min, 16).ok()?;
    Some(Mapping {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        exec: perms.as_bytes().get(2) == Some(&b'x'),
        dev: (maj << 20) | min,
        ino,
        path,
    })
}

pub fn read_maps(pid: u32) -> std::io::Result<Vec<Mapping>> {
    Ok(parse_maps(&std::fs::read_to_string(format!(
        "/proc/{pid}/maps"
    ))?))
}

/// A probe point: the function's ABI and its offset in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteFn {
    pub abi: WriteAbi,
    pub file_offset: u64,
}

const RUSTLS_WRITE: &str = "<rustls::conn::connection::Writer as std::io::Write>::write";

const TARGETS: &[(&str, WriteAbi)] = &[
    ("SSL_write", WriteAbi::SslWrite),
    ("SSL_write_ex", WriteAbi::SslWriteEx),
    ("crypto/tls.(*Conn).Write", WriteAbi::GoTlsWrite),
    // gnutls_record_send is a tail jump to send2; probing send2 sees both.
    ("gnutls_record_send2", WriteAbi::GnutlsSend),
];

/// The TLS write functions an ELF file defines; empty for anything else.
/// What a TLS library offers the probes: where its writes are, and the
/// functions that tell which socket an `SSL*` writes to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TlsLib {
    pub writes: Vec<WriteFn>,
    pub sockets: SocketHooks,
    /// OpenSSL 3 whose key derivation the wire backend probes: this file's
    /// own `EVP_KDF_derive` (a static build: Node, a static client), or the
    /// `libcrypto.so.3` a shared libssl is linked against.
    pub keys: bool,
}

impl TlsLib {
    /// Nothing here for the probes.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.sockets.is_empty()
    }
}

/// Finds the TLS functions in an ELF file; an empty `writes` for anything else.
pub fn tls_library(path: &Path) -> Result<TlsLib, DiscoverError> {
    let data = std::fs::read(path).map_err(|source| DiscoverError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !data.starts_with(b"\x7fELF") {
        return Ok(TlsLib::default());
    }
    let file = object::File::parse(&*data).map_err(|source| DiscoverError::Elf {
        path: path.to_path_buf(),
        source,
    })?;
    let mut entries: Vec<(WriteAbi, u64)> = Vec::new();
    let mut lib = TlsLib::default();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if !sym.is_definition() || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // Versioned dynamic names look like SSL_write@@OPENSSL_3.0.0.
        let base = name.split('@').next().unwrap_or(name);
        // Rust symbols are mangled; rustls's plaintext writer is found by its
        // demangled path, without the hash.
        if base.starts_with("_ZN") || base.starts_with("_R") {
            if !entries.iter().any(|(a, _)| *a == WriteAbi::RustlsWrite)
                && format!("{:#}", rustc_demangle::demangle(base)) == RUSTLS_WRITE
                && let Some(off) = vaddr_to_offset(&file, sym.address())
            {
                entries.push((WriteAbi::RustlsWrite, off));
            }
            continue;
        }
        let off = || vaddr_to_offset(&file, sym.address()).map(|o| o as usize);
        let h = &mut lib.sockets;
        match base {
            "SSL_set_fd" | "gnutls_transport_set_ptr" => {
                h.fd_setters.extend(off().map(|o| (o, FdArg::Rsi)))
            }
            "gnutls_transport_set_int2" | "gnutls_transport_set_ptr2" => {
                h.fd_setters.extend(off().map(|o| (o, FdArg::Rdx)))
            }
            "SSL_set_bio" if h.set_bio.is_none() => h.set_bio = off(),
            "BIO_new_socket" if h.bio_new_socket.is_none() => h.bio_new_socket = off(),
            // libcrypto: where OpenSSL 3 derives every TLS key (wire backend).
            "EVP_KDF_derive" if h.kdf.is_none() => h.kdf = off(),
            "SSL_free" if h.free.is_none() => h.free = off(),
            "SSL_do_handshake" | "SSL_connect" => {
                if let Some(o) = off()
                    && !h.handshakes.contains(&o)
                {
                    h.handshakes.push(o);
                }
            }
            _ => {}
        }
        let Some(&(_, abi)) = TARGETS.iter().find(|(n, _)| *n == base) else {
            continue;
        };
        if entries.iter().any(|(a, _)| *a == abi) {
            continue;
        }
        if let Some(off) = vaddr_to_offset(&file, sym.address()) {
            entries.push((abi, off));
        }
    }
    // A stripped Go binary (-ldflags=-s -w) has no symbol table, but Go's own
    // function table, .gopclntab, is always there.
    if !entries.iter().any(|(a, _)| *a == WriteAbi::GoTlsWrite)
        && let Some(sec) = file.section_by_name(".gopclntab")
        && let Ok(tab) = sec.data()
        && let Some((base, entry)) = pclntab_lookup(tab, "crypto/tls.(*Conn).Write")
        // Newer linkers leave textStart zero: entries then count from .text.
        && let Some(base) = if base != 0 {
            Some(base)
        } else {
            file.section_by_name(".text").map(|t| t.address())
        }
        && let Some(off) = vaddr_to_offset(&file, base + entry)
    {
        entries.push((WriteAbi::GoTlsWrite, off));
    }
    if entries.iter().any(|(a, _)| *a == WriteAbi::GoTlsWrite) {
        lib.sockets.go_keys = go_key_hooks(&file, &data);
    }
    lib.keys = lib.sockets.kdf.is_some() || needs_libcrypto3(&file);
    lib.writes = plan_probes(&data, &entries);
    Ok(lib)
}

/// Whether a shared object names OpenSSL 3's libcrypto among the libraries
/// it needs (DT_NEEDED names live in .dynstr): a libssl.so.3 always does,
/// and that libcrypto exports `EVP_KDF_derive`.
fn needs_libcrypto3(file: &object::File<'_>) -> bool {
    file.section_by_name(".dynstr")
        .and_then(|s| s.data().ok())
        .is_some_and(|d| d.split(|&b| b == 0).any(|n| n == b"libcrypto.so.3"))
}

/// Go `crypto/tls` functions of the wire backend's key route, in the order
/// of [`GoKeyHooks`]' fields (the three AEAD constructors together).
const GO_KEY_FNS: [&str; 6] = [
    "crypto/tls.(*halfConn).setTrafficSecret",
    "crypto/tls.aeadAESGCMTLS13",
    "crypto/tls.aeadAESGCM",
    "crypto/tls.aeadChaCha20Poly1305",
    "crypto/tls.(*halfConn).encrypt",
    "crypto/tls.(*Conn).Close",
];

/// Where a goroutine sets a connection's keys. The linker drops the
/// handshake side a binary never uses (a client has no serverHandshake), so
/// one of the two is enough; handleKeyUpdate is always reachable from Read.
const GO_HANDSHAKE_FNS: [&str; 2] = [
    "crypto/tls.(*Conn).clientHandshake",
    "crypto/tls.(*Conn).serverHandshake",
];
const GO_KEY_UPDATE_FN: &str = "crypto/tls.(*Conn).handleKeyUpdate";

/// Virtual addresses of Go functions by name, from the symbol table or,
/// in a stripped binary, from Go's own function table. 0: not in the binary.
fn go_fn_addrs<const N: usize>(file: &object::File<'_>, names: [&str; N]) -> [u64; N] {
    let mut addrs = [0u64; N];
    for sym in file.symbols() {
        if let Ok(name) = sym.name()
            && let Some(i) = names.iter().position(|n| *n == name)
            && sym.is_definition()
        {
            addrs[i] = sym.address();
        }
    }
    if addrs.contains(&0)
        && let Some(tab) = file
            .section_by_name(".gopclntab")
            .and_then(|s| s.data().ok())
    {
        let text = file.section_by_name(".text").map(|t| t.address());
        for (i, name) in names.iter().enumerate() {
            if addrs[i] != 0 {
                continue;
            }
            if let Some((base, entry)) = pclntab_lookup(tab, name)
                && let Some(base) = if base != 0 { Some(base) } else { text }
            {
                addrs[i] = base + entry;
            }
        }
    }
    addrs
}

/// The key route's probe points in a Go binary: every one of them, or none.
fn go_key_hooks(file: &object::File<'_>, data: &[u8]) -> Option<GoKeyHooks> {
    // Past the stack check: a probe there fires exactly once per call
    // (when the stack grows the function restarts from its entry, and
    // encrypt's record count must not see the record twice).
    let body = |a: u64| -> Option<usize> {
        let off = vaddr_to_offset(file, a)?;
        Some((off + go_body_start(data.get(off as usize..).unwrap_or(&[]))?) as usize)
    };
    let addrs = go_fn_addrs(file, GO_KEY_FNS);
    if addrs.contains(&0) {
        return None;
    }
    let mut offs = [0usize; GO_KEY_FNS.len()];
    for (o, &a) in offs.iter_mut().zip(&addrs) {
        *o = body(a)?;
    }
    let [update] = go_fn_addrs(file, [GO_KEY_UPDATE_FN]);
    if update == 0 {
        return None;
    }
    let mut handshakes = vec![body(update)?];
    for a in go_fn_addrs(file, GO_HANDSHAKE_FNS) {
        if a != 0 {
            handshakes.push(body(a)?);
        }
    }
    if handshakes.len() < 2 {
        return None;
    }
    Some(GoKeyHooks {
        handshakes,
        set_secret: offs[0],
        aeads: [offs[1], offs[2], offs[3]],
        encrypt: offs[4],
        close: offs[5],
    })
}

/// Offset of a Go function's first instruction after its stack-bound check
/// (`cmp …; jbe morestack`), which runs once per call with the arguments
/// still in their registers. None when the prologue is not the known one.
fn go_body_start(code: &[u8]) -> Option<u64> {
    let jbe = go_stack_check_len(code);
    if jbe == 0 {
        return None;
    }
    match code.get(jbe as usize..jbe as usize + 2)? {
        [0x0f, 0x86] => Some(jbe + 6),
        [0x76, _] => Some(jbe + 2),
        _ => None,
    }
}

/// Where to put the probes. The kernel emulates a probed call, jump or push
/// but single-steps most other instructions out of line, a second trap that
/// costs about 10 µs per call on a VM; so where a known prologue allows, the
/// probe moves to an emulated instruction that sees the same arguments.
fn plan_probes(data: &[u8], entries: &[(WriteAbi, u64)]) -> Vec<WriteFn> {
    let at = |abi| entries.iter().find(|(a, _)| *a == abi).map(|&(_, o)| o);
    let code = |off: u64| data.get(off as usize..).unwrap_or(&[]);
    let mut out = Vec::new();

    if let Some(go) = at(WriteAbi::GoTlsWrite) {
        out.push(WriteFn {
            abi: WriteAbi::GoTlsWrite,
            file_offset: go + go_stack_check_len(code(go)),
        });
    }

    if let Some(r) = at(WriteAbi::RustlsWrite) {
        out.push(WriteFn {
            abi: WriteAbi::RustlsWrite,
            file_offset: r,
        });
    }
    if let Some(g) = at(WriteAbi::GnutlsSend) {
        out.push(WriteFn {
            abi: WriteAbi::GnutlsSend,
            file_offset: g,
        });
    }

    let write = at(WriteAbi::SslWrite);
    let write_ex = at(WriteAbi::SslWriteEx);
    // OpenSSL 3: SSL_write_ex is `sub $N,%rsp; call <internal>` and SSL_write
    // calls the same internal function with the same registers (its length
    // widened to 64 bits). Probing that function's entry catches both, and a
    // return probe there still sees its caller's return address.
    if let Some(ex) = write_ex
        && let Some(internal) = openssl_internal_write(code(ex), ex)
        && starts_with_emulated(code(internal))
    {
        out.push(WriteFn {
            abi: WriteAbi::SslWriteEx,
            file_offset: internal,
        });
        if let Some(w) = write
            && !calls(code(w), w, internal, 96)
        {
            out.push(WriteFn {
                abi: WriteAbi::SslWrite,
                file_offset: w,
            });
        }
        return out;
    }
    for abi in [WriteAbi::SslWrite, WriteAbi::SslWriteEx] {
        if let Some(off) = at(abi) {
            out.push(WriteFn {
                abi,
                file_offset: off,
            });
        }
    }
    out
}

/// `sub $imm8,%rsp; call rel32` at `off`: the file offset of the call's target.
fn openssl_internal_write(code: &[u8], off: u64) -> Option<u64> {
    match code {
        [0x48, 0x83, 0xec, _, 0xe8, r0, r1, r2, r3, ..] => {
            let rel = i64::from(i32::from_le_bytes([*r0, *r1, *r2, *r3]));
            u64::try_from(off as i64 + 9 + rel).ok()
        }
        _ => None,
    }
}

/// Whether the first instruction is a push of a register, which the kernel emulates.
fn starts_with_emulated(code: &[u8]) -> bool {
    matches!(code, [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..])
}

/// Whether a `call rel32` to `target` appears in the first `window` bytes at `off`.
fn calls(code: &[u8], off: u64, target: u64, window: usize) -> bool {
    code.iter().take(window).enumerate().any(|(i, &b)| {
        b == 0xe8
            && code.get(i + 1..i + 5).is_some_and(|r| {
                let rel = i64::from(i32::from_le_bytes([r[0], r[1], r[2], r[3]]));
                off as i64 + i as i64 + 5 + rel == target as i64
            })
    })
}

/// Length of Go's stack-bound check at a function's entry, if `code` starts
/// with one, so the probe can sit on the conditional jump after it.
///
/// The kernel emulates a probed conditional jump but single-steps most other
/// instructions out of line, which costs a second trap on every call. The
/// check touches neither the argument registers (RAX, RBX, RCX) nor the stack,
/// so a probe on the jump sees exactly what a probe on the entry would; when
/// the stack must grow, the function restarts from its entry and the probe
/// fires again, on a buffer it has already handled.
fn go_stack_check_len(code: &[u8]) -> u64 {
    // lea -N(%rsp),%r12 (disp8 or disp32), then cmp 0x10(%r14),%r12
    let after_lea = match code {
        [0x4c, 0x8d, 0x64, 0x24, _, ..] => 5,
        [0x4c, 0x8d, 0xa4, 0x24, _, _, _, _, ..] => 8,
        // small frames compare the stack pointer itself: cmp 0x10(%r14),%rsp
        [0x49, 0x3b, 0x66, 0x10, ..] => 0,
        _ => return 0,
    };
    let cmp_len = if after_lea == 0 {
        4
    } else if code.get(after_lea..after_lea + 4) == Some(&[0x4d, 0x3b, 0x66, 0x10]) {
        after_lea + 4
    } else {
        return 0;
    };
    // followed by jbe rel32 or jbe rel8
    match code.get(cmp_len..cmp_len + 2) {
        Some([0x0f, 0x86]) | Some([0x76, _]) => cmp_len as u64,
        _ => 0,
    }
}

/// Function `name` in a Go 1.18+ `.gopclntab`: `(textStart, entry offset)`.
///
/// Layout (runtime/symtab.go, `pcHeader`): magic, two pad bytes, minLC,
/// ptrSize, then pointer-sized nfunc, nfiles, textStart, funcnameOffset,
/// cuOffset, filetabOffset, pctabOffset, pclnOffset. At pclnOffset,
/// nfunc+1 pairs of u32 (entry offset from textStart, offset of the
/// function's `_func`); each `_func` starts with u32 entryOff, i32 nameOff
/// into the name table.
pub fn pclntab_lookup(tab: &[u8], name: &str) -> Option<(u64, u64)> {
    let u32_at = |o: usize| {
        tab.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let magic = u32_at(0)?;
    if magic != 0xffff_fff0 && magic != 0xffff_fff1 {
        return None;
    }
    let ptr = *tab.get(7)? as usize;
    if ptr != 8 {
        return None;
    }
    let word = |i: usize| -> Option<u64> {
        let o = 8 + i * ptr;
        tab.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let nfunc = word(0)? as usize;
    let text_start = word(2)?;
    let funcname = word(3)? as usize;
    let pcln = word(7)? as usize;
    for i in 0..nfunc {
        let entry = u32_at(pcln + i * 8)?;
        let func = pcln + u32_at(pcln + i * 8 + 4)? as usize;
        let name_off = u32_at(func + 4)? as usize;
        let start = funcname + name_off;
        let raw = tab.get(start..)?;
        let end = raw.iter().position(|&c| c == 0)?;
        if &raw[..end] == name.as_bytes() {
            return Some((text_start, u64::from(entry)));
        }
    }
    None
}

/// Uprobes take file offsets; symbols give virtual addresses.
fn vaddr_to_offset(file: &object::File<'_>, vaddr: u64) -> Option<u64> {
    file.segments().find_map(|seg| {
        let (foff, fsize) = seg.file_range();
        let start = seg.address();
        (vaddr >= start && vaddr < start + fsize).then(|| vaddr - start + foff)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines_with_kernel_dev_encoding() {
        let m = parse_maps(
            "7f0000000000-7f0000001000 r-xp 00002000 fd:01 1234 /usr/lib/x86_64-linux-gnu/libssl.so.3\n\
             7f0000002000-7f0000003000 rw-p 00000000 00:00 0 \n\
             7ffd00000000-7ffd00001000 r-xp 00000000 00:00 0 [vdso]\n\
             55d000000000-55d000001000 r-xp 00000000 08:02 99 /opt/my app (deleted)\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].dev, (0xfd << 20) | 1);
        assert_eq!(m[0].ino, 1234);
        assert!(m[0].exec);
        assert_eq!(m[1].path, "/opt/my app (deleted)");
    }

    #[test]
    fn finds_ssl_write_in_the_system_libssl() {
        let lib = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        if !lib.exists() {
            panic!(
                "libssl3 is installed by the test command; missing {}",
                lib.display()
            );
        }
        let tls = tls_library(lib).unwrap();
        let s = &tls.sockets;
        assert!(
            s.fd_setters.len() == 1
                && s.set_bio.is_some()
                && s.handshakes.len() == 2
                && s.free.is_some(),
            "{tls:?}"
        );
        // Its keys come from the libcrypto.so.3 it needs.
        assert!(tls.keys && s.kdf.is_none(), "{tls:?}");
        // libcrypto itself has no write function but derives the keys.
        let crypto = tls_library(Path::new("/usr/lib/x86_64-linux-gnu/libcrypto.so.3")).unwrap();
        assert!(crypto.sockets.kdf.is_some() && crypto.keys, "{crypto:?}");
        let f = tls.writes;
        assert!(!f.is_empty());
        assert!(f.iter().any(|w| w.abi == WriteAbi::SslWriteEx));
        assert!(f.iter().all(|w| w.file_offset > 0));
    }

    #[test]
    fn go_probe_skips_the_stack_check_only_when_it_is_one() {
        let big = [
            0x4c, 0x8d, 0x64, 0x24, 0xb8, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x93, 0x07, 0, 0,
        ];
        assert_eq!(go_stack_check_len(&big), 9);
        let small = [0x49, 0x3b, 0x66, 0x10, 0x76, 0x20];
        assert_eq!(go_stack_check_len(&small), 4);
        let other = [0x55, 0x48, 0x89, 0xe5];
        assert_eq!(go_stack_check_len(&other), 0);
        let no_jump = [0x49, 0x3b, 0x66, 0x10, 0x90, 0x90];
        assert_eq!(go_stack_check_len(&no_jump), 0);
    }

    #[test]
    fn go_key_probes_sit_after_the_stack_check_jump_or_nowhere() {
        // cmp 0x10(%r14),%rsp; jbe rel32; push %rbp
        let small = [0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 1, 0, 0, 0, 0x55];
        assert_eq!(go_body_start(&small), Some(10));
        // lea -N(%rsp),%r12 (disp32); cmp 0x10(%r14),%r12; jbe rel8
        let big = [
            0x4c, 0x8d, 0xa4, 0x24, 0xc8, 0xfe, 0xff, 0xff, 0x4d, 0x3b, 0x66, 0x10, 0x76, 0x20,
        ];
        assert_eq!(go_body_start(&big), Some(14));
        // No known stack check: no probe point, so no key route at all.
        assert_eq!(go_body_start(&[0x55, 0x48, 0x89, 0xe5]), None);
    }

    #[test]
    fn openssl_probe_moves_to_the_shared_internal_write_when_the_prologue_is_known() {
        // SSL_write_ex at 0x100: sub $8,%rsp; call 0x40 (rel = 0x40 - 0x109)
        let mut data = vec![0xccu8; 0x200];
        let rel = (0x40i32 - 0x109).to_le_bytes();
        data[0x100..0x109]
            .copy_from_slice(&[0x48, 0x83, 0xec, 0x08, 0xe8, rel[0], rel[1], rel[2], rel[3]]);
        data[0x40..0x42].copy_from_slice(&[0x41, 0x56]); // push %r14
        // SSL_write at 0x180 calls it too, after some setup
        let rel2 = (0x40i32 - (0x18a + 5)).to_le_bytes();
        data[0x18a..0x18f].copy_from_slice(&[0xe8, rel2[0], rel2[1], rel2[2], rel2[3]]);
        let plan = plan_probes(
            &data,
            &[(WriteAbi::SslWrite, 0x180), (WriteAbi::SslWriteEx, 0x100)],
        );
        assert_eq!(
            plan,
            vec![WriteFn {
                abi: WriteAbi::SslWriteEx,
                file_offset: 0x40
            }]
        );

        // An unknown callee prologue: both entries, unchanged.
        data[0x40] = 0x48;
        let plan = plan_probes(
            &data,
            &[(WriteAbi::SslWrite, 0x180), (WriteAbi::SslWriteEx, 0x100)],
        );
        assert_eq!(plan.len(), 2);
        assert!(plan.contains(&WriteFn {
            abi: WriteAbi::SslWrite,
            file_offset: 0x180
        }));
    }

    #[test]
    fn pclntab_rejects_what_it_does_not_know() {
        assert_eq!(pclntab_lookup(&[0u8; 64], "x"), None);
        let mut t = vec![0u8; 64];
        t[..4].copy_from_slice(&0xffff_fffau32.to_le_bytes()); // Go 1.16
        t[7] = 8;
        assert_eq!(pclntab_lookup(&t, "x"), None);
    }

    #[test]
    fn non_elf_files_have_no_functions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        assert_eq!(tls_library(&p).unwrap(), TlsLib::default());
    }
}
