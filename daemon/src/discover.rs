//! Finding TLS write functions in the files a process maps.

use std::path::{Path, PathBuf};

use kloak_bpf::WriteAbi;
use object::{Object, ObjectSegment, ObjectSymbol};

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

const TARGETS: &[(&str, WriteAbi)] = &[
    ("SSL_write", WriteAbi::SslWrite),
    ("SSL_write_ex", WriteAbi::SslWriteEx),
    ("crypto/tls.(*Conn).Write", WriteAbi::GoTlsWrite),
];

/// The TLS write functions an ELF file defines; empty for anything else.
pub fn tls_write_functions(path: &Path) -> Result<Vec<WriteFn>, DiscoverError> {
    let data = std::fs::read(path).map_err(|source| DiscoverError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !data.starts_with(b"\x7fELF") {
        return Ok(Vec::new());
    }
    let file = object::File::parse(&*data).map_err(|source| DiscoverError::Elf {
        path: path.to_path_buf(),
        source,
    })?;
    let mut found: Vec<WriteFn> = Vec::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if !sym.is_definition() || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        // Versioned dynamic names look like SSL_write@@OPENSSL_3.0.0.
        let base = name.split('@').next().unwrap_or(name);
        let Some(&(_, abi)) = TARGETS.iter().find(|(n, _)| *n == base) else {
            continue;
        };
        if found.iter().any(|f| f.abi == abi) {
            continue;
        }
        if let Some(file_offset) = vaddr_to_offset(&file, sym.address()) {
            found.push(WriteFn { abi, file_offset });
        }
    }
    Ok(found)
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
        let f = tls_write_functions(lib).unwrap();
        assert!(f.iter().any(|w| w.abi == WriteAbi::SslWrite));
        assert!(f.iter().any(|w| w.abi == WriteAbi::SslWriteEx));
        assert!(f.iter().all(|w| w.file_offset > 0));
    }

    #[test]
    fn non_elf_files_have_no_functions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        assert!(tls_write_functions(&p).unwrap().is_empty());
    }
}
