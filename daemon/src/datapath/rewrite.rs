//! The rewriter's pure parts: the secret table, finding placeholders in a
//! buffer (ASCII and HPACK Huffman-coded), and writing bytes over bytes only
//! if they are still what was seen. Whether a value may be written at all
//! is the authoriser's call; when and how is the backend's.

use std::collections::HashMap;
use std::sync::Arc;

use kloak_bpf::{KEY_LEN, PREFIX, PREFIX_LEN, SplitTail};
use zeroize::Zeroizing;

use crate::datapath::hpack;
use crate::datapath::procmem;
use crate::datapath::secrets::Secret;

/// Secrets as the data path needs them: by the id the kernel reports, and by
/// map key for the user-space scan.
#[derive(Default)]
pub struct SecretTable {
    by_id: HashMap<u32, Arc<Secret>>,
    by_key: HashMap<[u8; KEY_LEN], Vec<u32>>,
}

impl SecretTable {
    pub fn new(secrets: impl IntoIterator<Item = Secret>) -> Self {
        let mut t = SecretTable::default();
        for s in secrets {
            t.insert(s);
        }
        t
    }

    pub fn get(&self, id: u32) -> Option<&Arc<Secret>> {
        self.by_id.get(&id)
    }

    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_id.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Adds or replaces the secret with `s.id`; returns the one it replaced.
    pub fn insert(&mut self, s: Secret) -> Option<Arc<Secret>> {
        let old = self.remove(s.id);
        let key = kloak_bpf::placeholder_key(s.placeholder.as_bytes())
            .expect("minted placeholders have keys");
        self.by_key.entry(key).or_default().push(s.id);
        self.by_id.insert(s.id, Arc::new(s));
        old
    }

    pub fn remove(&mut self, id: u32) -> Option<Arc<Secret>> {
        let old = self.by_id.remove(&id)?;
        if let Some(key) = kloak_bpf::placeholder_key(old.placeholder.as_bytes())
            && let Some(ids) = self.by_key.get_mut(&key)
        {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.by_key.remove(&key);
            }
        }
        Some(old)
    }

    /// Whose placeholder a write cut short: the one secret whose
    /// placeholder begins with the random characters the write held and is
    /// longer than what it held. None when nothing or more than one fits.
    pub fn cut_short(&self, t: &SplitTail) -> Option<&Arc<Secret>> {
        if t.seen.is_empty() {
            return None;
        }
        let mut fits = self.by_id.values().filter(|s| {
            let p = s.placeholder.as_bytes();
            p.len() > t.len as usize && p[PREFIX_LEN..].starts_with(&t.seen)
        });
        let first = fits.next()?;
        fits.next().is_none().then_some(first)
    }

    /// The secret whose placeholder starts at `bytes[0]`, if any.
    pub fn match_at(&self, bytes: &[u8]) -> Option<&Arc<Secret>> {
        let rand = bytes.get(PREFIX_LEN..)?;
        for klen in (2..=KEY_LEN.min(rand.len())).rev() {
            let mut key = [0u8; KEY_LEN];
            key[..klen].copy_from_slice(&rand[..klen]);
            for id in self.by_key.get(&key).into_iter().flatten() {
                let s = &self.by_id[id];
                if bytes.starts_with(s.placeholder.as_bytes()) {
                    return Some(s);
                }
            }
        }
        None
    }

    /// Every placeholder in a whole buffer, left to right, as the kernel's
    /// scan would report them; tokens that match nothing are counted, and a
    /// token the buffer ends inside is a split.
    pub fn scan(&self, data: &[u8]) -> Scan {
        let mut found = Scan::default();
        let mut i = 0;
        while let Some(pos) = find(&data[i..], PREFIX) {
            let at = i + pos;
            match self.match_at(&data[at..]) {
                Some(s) => {
                    found.matches.push((at, s.clone()));
                    i = at + s.placeholder.len();
                }
                None => {
                    match SplitTail::find(data, Some(at)) {
                        Some(t) => found.split = Some(t),
                        None => found.unknown += 1,
                    }
                    i = at + PREFIX_LEN;
                }
            }
        }
        found.split = found.split.or_else(|| SplitTail::find(data, None));
        found
    }

    /// HTTP/2: every HPACK-safe placeholder whose Huffman code is in `data`
    /// (at any bit offset), with the bytes that code spans before and after
    /// swapping in the value's code of the same length.
    pub fn huffman_swaps(&self, data: &[u8]) -> Vec<HuffSwap> {
        let mut out = Vec::new();
        for s in self.by_id.values().filter(|s| s.hpack_safe) {
            let pbits = hpack::bits_of(s.placeholder.as_bytes());
            for at in hpack::find_bits(data, &pbits) {
                let (first, end) = (at / 8, (at + pbits.len()).div_ceil(8));
                let original = data[first..end].to_vec();
                let mut patched = Zeroizing::new(original.clone());
                hpack::put_bits(
                    &mut patched,
                    at - first * 8,
                    &hpack::bits_of(s.value.expose()),
                );
                out.push(HuffSwap {
                    secret: s.clone(),
                    offset: first,
                    original,
                    patched,
                });
            }
        }
        out
    }
}

/// What a user-space scan of a whole buffer found.
#[derive(Default)]
pub struct Scan {
    /// Offset of each known placeholder, and whose it is.
    pub matches: Vec<(usize, Arc<Secret>)>,
    /// `kloak:` tokens that name no secret.
    pub unknown: u32,
    pub split: Option<SplitTail>,
}

/// One HPACK placeholder found by [`SecretTable::huffman_swaps`].
pub struct HuffSwap {
    pub secret: Arc<Secret>,
    /// Offset in the buffer of the first byte the code touches.
    pub offset: usize,
    pub original: Vec<u8>,
    pub patched: Zeroizing<Vec<u8>>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A stopped process's memory. The agent reads and writes it through
/// `process_vm_*` (or /proc/PID/mem); unit tests through a buffer.
pub trait Memory {
    fn read(&self, pid: u32, addr: u64, len: usize) -> std::io::Result<Vec<u8>>;
    fn write(&self, pid: u32, addr: u64, data: &[u8]) -> std::io::Result<()>;
}

pub struct ProcMem;

impl Memory for ProcMem {
    fn read(&self, pid: u32, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
        procmem::read(pid, addr, len)
    }

    fn write(&self, pid: u32, addr: u64, data: &[u8]) -> std::io::Result<()> {
        procmem::write(pid, addr, data)
    }
}

/// What became of one write over another process's bytes.
#[derive(Debug)]
pub enum Patched {
    Written,
    /// The bytes are no longer what was seen: nothing was written.
    Mismatch,
    ReadFailed(std::io::Error),
    WriteFailed(std::io::Error),
}

/// Writes `to` at `addr` only if the bytes there are still `from`: never
/// over anything else.
pub fn patch(mem: &dyn Memory, pid: u32, addr: u64, from: &[u8], to: &[u8]) -> Patched {
    // A placeholder is exactly as long as its value; anything else (a
    // damaged record) must not shift the bytes around it.
    if from.len() != to.len() {
        return Patched::Mismatch;
    }
    match mem.read(pid, addr, from.len()) {
        Ok(cur) if cur == from => {}
        Ok(_) => return Patched::Mismatch,
        Err(e) => return Patched::ReadFailed(e),
    }
    match mem.write(pid, addr, to) {
        Ok(()) => Patched::Written,
        Err(e) => Patched::WriteFailed(e),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::datapath::authorise::tests::secret;
    use crate::datapath::rules::Rules;

    /// One process's memory: a buffer at a base address.
    pub(crate) struct Buf {
        pub base: u64,
        pub bytes: RefCell<Vec<u8>>,
        pub fail_writes: bool,
    }

    impl Buf {
        pub(crate) fn new(base: u64, bytes: &[u8]) -> Self {
            Buf {
                base,
                bytes: RefCell::new(bytes.to_vec()),
                fail_writes: false,
            }
        }
    }

    impl Memory for Buf {
        fn read(&self, _pid: u32, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
            let at = addr
                .checked_sub(self.base)
                .ok_or(std::io::ErrorKind::InvalidInput)? as usize;
            self.bytes
                .borrow()
                .get(at..at + len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
        }

        fn write(&self, _pid: u32, addr: u64, data: &[u8]) -> std::io::Result<()> {
            if self.fail_writes {
                return Err(std::io::ErrorKind::PermissionDenied.into());
            }
            let at = (addr - self.base) as usize;
            self.bytes.borrow_mut()[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    fn plain(id: u32, placeholder: &str) -> Secret {
        secret(
            id,
            placeholder,
            &vec![b'v'; placeholder.len()],
            Rules::default(),
        )
    }

    #[test]
    fn match_at_prefers_the_full_placeholder() {
        let t = SecretTable::new([plain(1, "kloak:AB"), plain(2, "kloak:CDEFGHJKMN")]);
        assert_eq!(t.match_at(b"kloak:AB\r\n").unwrap().id, 1);
        assert_eq!(t.match_at(b"kloak:CDEFGHJKMN").unwrap().id, 2);
        assert!(
            t.match_at(b"kloak:CDEFGHJKMX").is_none(),
            "full bytes must match, not just the key"
        );
        assert!(t.match_at(b"kloak:ZZ").is_none());
    }

    #[test]
    fn replacing_a_secret_drops_its_old_placeholder() {
        let mut t = SecretTable::new([plain(1, "kloak:ABCDEFGH")]);
        let old = t.insert(plain(1, "kloak:JKMNPQRS")).unwrap();
        assert_eq!(old.placeholder, "kloak:ABCDEFGH");
        assert!(t.match_at(b"kloak:ABCDEFGH").is_none());
        assert_eq!(t.match_at(b"kloak:JKMNPQRS").unwrap().id, 1);
        assert!(t.remove(1).is_some());
        assert!(t.is_empty());
    }

    #[test]
    fn a_scan_finds_every_placeholder_counts_strangers_and_sees_a_cut() {
        let t = SecretTable::new([plain(1, "kloak:ABCDEFGH"), plain(2, "kloak:JKMNPQRSTV")]);
        let data =
            b"a=kloak:ABCDEFGH&b=kloak:ZZZZZZZZ!&c=kloak:JKMNPQRSTV&a=kloak:ABCDEFGH&d=kloak:JKM";
        let s = t.scan(data);
        let got: Vec<(usize, u32)> = s.matches.iter().map(|(o, s)| (*o, s.id)).collect();
        assert_eq!(got, vec![(2, 1), (37, 2), (56, 1)]);
        assert_eq!(s.unknown, 1, "kloak:ZZZZZZZZ names no secret");
        let cut = s.split.expect("the write ends inside a placeholder");
        assert_eq!(cut.offset as usize, data.len() - 9);
        assert_eq!(t.cut_short(&cut).unwrap().id, 2);
        // A write ending in the prefix's first letters is a cut too.
        assert!(t.scan(b"x: kloa").split.is_some());
        assert!(t.scan(b"x: kl").split.is_none(), "too common to call a cut");
    }

    #[test]
    fn a_patch_writes_only_over_the_bytes_that_were_seen() {
        let mem = Buf::new(0x1000, b"Bearer kloak:ABCDEFGH\r\n");
        assert!(matches!(
            patch(&mem, 1, 0x1007, b"kloak:ABCDEFGH", b"sk-real-value1"),
            Patched::Written
        ));
        assert_eq!(&mem.bytes.borrow()[..], b"Bearer sk-real-value1\r\n");
        // The application changed the buffer since: nothing is written.
        assert!(matches!(
            patch(&mem, 1, 0x1007, b"kloak:ABCDEFGH", b"sk-other-value"),
            Patched::Mismatch
        ));
        assert_eq!(&mem.bytes.borrow()[..], b"Bearer sk-real-value1\r\n");
        // Scrubbing puts the placeholder back.
        assert!(matches!(
            patch(&mem, 1, 0x1007, b"sk-real-value1", b"kloak:ABCDEFGH"),
            Patched::Written
        ));
        assert_eq!(&mem.bytes.borrow()[..], b"Bearer kloak:ABCDEFGH\r\n");
        assert!(matches!(
            patch(&mem, 1, 0x9000, b"kloak:ABCDEFGH", b"sk-real-value1"),
            Patched::ReadFailed(_)
        ));
        assert!(matches!(
            patch(&mem, 1, 0x1007, b"kloak:ABCDEFGH", b"sk-short"),
            Patched::Mismatch
        ));
        assert_eq!(&mem.bytes.borrow()[..], b"Bearer kloak:ABCDEFGH\r\n");
    }

    #[test]
    fn a_huffman_swap_touches_only_the_bytes_of_the_code() {
        let value = b"0123456789abcdef";
        let mut minted = crate::datapath::secrets::Minted::default();
        let (p, safe) = minted.mint_for(value);
        assert!(safe);
        let s = secret(1, &p, value, Rules::default());
        let t = SecretTable::new([s]);
        let mut bits = vec![true; 5];
        bits.extend(hpack::bits_of(p.as_bytes()));
        let mut data = vec![0u8; 4 + bits.len().div_ceil(8) + 4];
        hpack::put_bits(&mut data[4..], 0, &bits);
        let swaps = t.huffman_swaps(&data);
        assert_eq!(swaps.len(), 1);
        let sw = &swaps[0];
        assert_eq!(sw.offset, 4, "the code starts 5 bits into byte 4");
        let mut after = data.clone();
        after[sw.offset..sw.offset + sw.patched.len()].copy_from_slice(&sw.patched);
        assert_eq!(
            hpack::find_bits(&after, &hpack::bits_of(value)),
            vec![4 * 8 + 5]
        );
        assert_eq!(after[..4], data[..4]);
        assert_eq!(after[4] >> 3, data[4] >> 3, "bits before the code kept");
        assert!(t.huffman_swaps(&after).is_empty());
    }
}
