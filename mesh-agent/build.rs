//! Builds the eBPF object (mesh-ebpf) with the nightly toolchain for bpfel-unknown-none and
//! hands its path to the agent through `MESH_EBPF_OBJECT`. Cargo's own fingerprinting of the
//! eBPF crate keeps a rebuild instant when neither it nor mesh-common changed.

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("mesh-agent has no parent directory")?;
    let ebpf_dir = workspace.join("mesh-ebpf");
    for watched in [
        "mesh-ebpf/src",
        "mesh-ebpf/Cargo.toml",
        "mesh-ebpf/rust-toolchain.toml",
        "mesh-common/src",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    // The programs are the same bytecode on every architecture, but aya-ebpf's helpers for
    // registers are chosen by `bpf_target_arch`: the agent's own (x86_64 or aarch64).
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("bpf");
    // Each architecture's object in a directory of its own, so building for one does not
    // rebuild the other's.
    let target_dir = match arch.as_str() {
        "x86_64" => target_dir,
        other => target_dir.join(other),
    };
    let arch_cfg = format!("--cfg=bpf_target_arch=\"{arch}\"");
    let rustflags = [arch_cfg.as_str(), "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f");
    // The pinned nightly named by mesh-ebpf/rust-toolchain.toml.
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    let toolchain_toml = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let toolchain = mesh_common::toolchain_channel(&toolchain_toml)
        .with_context(|| format!("{} names no channel", toolchain_file.display()))?;
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "cargo", "build", "--locked", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(ebpf_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // Settings of the outer (stable, host) build must not leak into the eBPF build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd
        .status()
        .context("running the nightly toolchain through rustup (run `cargo xtask setup`)")?;
    if !status.success() {
        bail!("building mesh-ebpf failed ({status}); `cargo xtask setup` installs rust-src and bpf-linker");
    }
    let object = target_dir.join("bpfel-unknown-none/release/mesh");
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", object.display());
    Ok(())
}
