//! The wire backend's in-kernel crypto (bpf/src/bpf/chacha.h, gcm.h), built
//! for the host and checked against published test vectors. A wrong tag
//! correction would kill every connection it touched, so the arithmetic is
//! checked here on its own, before any packet.

use std::path::Path;
use std::process::Command;

#[test]
fn chacha_poly1305_and_gcm_match_the_published_vectors() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/host/crypto_vectors.c");
    let out = tempfile::tempdir().expect("tempdir");
    let bin = out.path().join("crypto_vectors");
    let st = Command::new("cc")
        .args(["-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("cc runs");
    assert!(st.success(), "building {} failed", src.display());
    let run = Command::new(&bin).output().expect("the vector check runs");
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{said}");
    assert_eq!(said.trim(), "ok");
}
