//! Compiles the C datapath (`bpf/tern_fastpath.c` at the repository root)
//! into a BPF object that `src/lib.rs` embeds with `include_bytes!`.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "tern_fastpath.c";
const PACKAGES: &str = "clang and libbpf-dev (apt-get install clang libbpf-dev, or `make setup`)";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let bpf_dir = manifest.join("../../bpf");
    let source = bpf_dir.join(SOURCE);
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("tern_fastpath.o");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-env-changed=CLANG");

    if !Path::new("/usr/include/bpf/bpf_helpers.h").is_file() {
        fail(&format!("/usr/include/bpf/bpf_helpers.h is missing: building the eBPF fast path needs {PACKAGES}"));
    }
    // asm/types.h lives under the multiarch include directory on Debian.
    let arch = env::var("HOST").unwrap_or_default().split('-').next().unwrap_or("x86_64").to_string();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let output = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I{multiarch}"))
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .output();
    match output {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fail(&format!("`{clang}` not found: building the eBPF fast path needs {PACKAGES}"))
        }
        Err(e) => fail(&format!("cannot run `{clang}`: {e}")),
        Ok(o) if !o.status.success() => fail(&format!(
            "`{clang}` failed to compile {}:\n{}{}",
            source.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Ok(_) => {}
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: tern-bpf: {msg}");
    println!("cargo:warning=tern-bpf: {}", msg.lines().next().unwrap_or(msg));
    std::process::exit(1);
}
