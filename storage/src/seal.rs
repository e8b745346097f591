//! Sealing records: ChaCha20-Poly1305 with a random nonce per record.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has mode {mode:o}; a key file must not be readable by group or others (chmod 600)"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("{path} must hold 32 bytes, raw or as 64 hex digits; it holds {len} bytes")]
    Length { path: PathBuf, len: usize },
    #[error("writing a new key to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The key records are sealed with. Never printed.
pub struct Key {
    raw: Zeroizing<[u8; 32]>,
    key: LessSafeKey,
    /// First bytes of a hash of the key: tells "another key" from "corrupt".
    pub(crate) fingerprint: [u8; 8],
}

impl Clone for Key {
    fn clone(&self) -> Key {
        Key::from_bytes(&self.raw)
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

impl Key {
    pub fn from_bytes(raw: &[u8; 32]) -> Key {
        let d = ring::digest::digest(&ring::digest::SHA256, raw);
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&d.as_ref()[..8]);
        Key {
            raw: Zeroizing::new(*raw),
            key: LessSafeKey::new(
                UnboundKey::new(&CHACHA20_POLY1305, raw).expect("32 bytes is the key length"),
            ),
            fingerprint,
        }
    }

    /// Reads a key file: 32 raw bytes or 64 hex digits (a trailing newline
    /// is fine, as `openssl rand -hex 32 > key` writes). Mode must be 0600
    /// or stricter.
    pub fn from_file(path: &Path) -> Result<Key, KeyError> {
        let md = std::fs::metadata(path).map_err(|source| KeyError::Read {
            path: path.into(),
            source,
        })?;
        let mode = md.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Mode {
                path: path.into(),
                mode,
            });
        }
        let data = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.into(),
            source,
        })?);
        let trimmed: &[u8] = if data.len() == 32 {
            &data
        } else {
            data.trim_ascii()
        };
        let mut raw = Zeroizing::new([0u8; 32]);
        if trimmed.len() == 32 {
            raw.copy_from_slice(trimmed);
        } else if trimmed.len() == 64
            && let Some(bytes) = trimmed
                .chunks(2)
                .map(|p| Some(hex_val(p[0])? << 4 | hex_val(p[1])?))
                .collect::<Option<Vec<u8>>>()
        {
            raw.copy_from_slice(&bytes);
        } else {
            return Err(KeyError::Length {
                path: path.into(),
                len: trimmed.len(),
            });
        }
        Ok(Key::from_bytes(&raw))
    }

    /// Reads `path`, or creates it (0600, 32 random bytes) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Key, KeyError> {
        if !path.exists() {
            let mut raw = Zeroizing::new([0u8; 32]);
            SystemRandom::new()
                .fill(&mut raw[..])
                .expect("the system random source works");
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_0600()
                .open(path)
                .map_err(|source| KeyError::Write {
                    path: path.into(),
                    source,
                })?;
            f.write_all(&raw[..]).map_err(|source| KeyError::Write {
                path: path.into(),
                source,
            })?;
        }
        Key::from_file(path)
    }

    /// nonce || ciphertext || tag, bound to `aad`.
    pub(crate) fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .expect("sealing cannot fail for in-memory buffers");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (n, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).ok()?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let plain_len = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?
            .len();
        buf.truncate(plain_len);
        Some(buf)
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let k = Key::from_bytes(&[7u8; 32]);
        let s = k.seal(b"secrets/1", b"value");
        assert_eq!(&k.open(b"secrets/1", &s).unwrap()[..], b"value");
        assert!(k.open(b"secrets/2", &s).is_none(), "bound to its slot");
        let other = Key::from_bytes(&[8u8; 32]);
        assert!(other.open(b"secrets/1", &s).is_none());
        assert!(k.open(b"secrets/1", &s[..5]).is_none());
        assert_eq!(format!("{k:?}"), "Key(<redacted>)");
    }

    #[test]
    fn key_files_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(
            &p,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let hex = Key::from_file(&p).unwrap();
        std::fs::write(&p, "short").unwrap();
        let e = Key::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("32 bytes") && !e.contains("short"), "{e}");
        let g = d.path().join("generated");
        let a = Key::load_or_create(&g).unwrap();
        let b = Key::load_or_create(&g).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, hex.fingerprint);
        assert_eq!(
            std::fs::metadata(&g).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
