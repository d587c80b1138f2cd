//! Embeds the eBPF object built by `cargo xtask build-ebpf` (target/eddy-ebpf.o).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=EDDY_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let object = match std::env::var_os("EDDY_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
            let workspace = manifest.parent().unwrap().to_path_buf();
            let target = match std::env::var_os("CARGO_TARGET_DIR") {
                Some(dir) if !dir.is_empty() => {
                    let dir = PathBuf::from(dir);
                    if dir.is_absolute() {
                        dir
                    } else {
                        workspace.join(dir)
                    }
                }
                _ => workspace.join("target"),
            };
            target.join("eddy-ebpf.o")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "\n\neBPF object not found at {}\nbuild it first with: cargo xtask build-ebpf\n\n",
            object.display()
        );
    }
    println!("cargo:rustc-env=EDDY_EBPF_OBJECT={}", object.display());
}
