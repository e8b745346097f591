//! Compiles the BPF programs with clang and writes their skeletons to OUT_DIR.
//! The second build swaps the in-place write helper so its verifier shape can
//! be checked on kernels whose lockdown refuses the real helper.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "src/bpf/kloak.bpf.c";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
    let target = match arch.as_str() {
        "x86_64" => "x86",
        other => panic!("kloak's BPF programs read x86_64 registers; {other} is not supported yet"),
    };
    for (name, extra) in [
        ("kloak", None),
        ("kloak_verify", Some("-DKLOAK_VERIFY_ONLY")),
    ] {
        let mut args = vec![
            format!("-D__TARGET_ARCH_{target}"),
            "-O2".to_string(),
            "-Wall".to_string(),
        ];
        if let Some(e) = extra {
            args.push(e.to_string());
        }
        SkeletonBuilder::new()
            .source(SRC)
            .obj(out.join(format!("{name}.bpf.o")))
            .clang_args(args)
            .build_and_generate(out.join(format!("{name}.skel.rs")))
            .unwrap_or_else(|e| panic!("building the {name} BPF skeleton: {e:#}"));
    }
    println!("cargo:rerun-if-changed=src/bpf");
}
