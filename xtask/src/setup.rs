//! Prerequisites, installed idempotently: Debian packages, the pinned nightly with rust-src,
//! bpf-linker built against LLVM 22, cargo-fuzz for the parsers' fuzz targets, the sandbox's
//! Kubernetes control plane (`kube_tools`) and helm for the chart's checks (`helm`). Each
//! step checks first, so a second run takes a fraction of a second.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{progress, run};

/// Debian packages: LLVM 22 for bpf-linker; iproute2, util-linux and procps for the
/// sandbox; curl and python3 for the demo's pods; prometheus for `promtool` and the
/// sandbox's metrics server; python3-venv for the manifest validator; tcpdump and
/// openssl for the mTLS tests; iperf3 for the benchmarks; chromium (headless) to render
/// `meshctl dashboard` in its sandbox test; dnsmasq as the sandbox nodes' resolver; the
/// arm64 cross gcc, C library and qemu-user (`cross::ARM64_PACKAGES`).
const APT_PACKAGES: [&str; 19] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "util-linux",
    "procps",
    "curl",
    "python3",
    "python3-venv",
    "prometheus",
    "ca-certificates",
    "tcpdump",
    "openssl",
    "iperf3",
    "chromium",
    "dnsmasq-base",
    crate::cross::ARM64_PACKAGES[0],
    crate::cross::ARM64_PACKAGES[1],
    crate::cross::ARM64_PACKAGES[2],
];

const BPF_LINKER_VERSION: &str = "0.13.0";

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// What the eBPF build (`-Z build-std=core`) and its lint need from the nightly.
const NIGHTLY_COMPONENTS: [&str; 3] = ["rust-src", "clippy", "rustfmt"];

pub fn ensure() -> Result<()> {
    ensure_rust()?;
    crate::kube_tools::ensure()?;
    crate::helm::ensure()?;
    crate::jaeger::ensure()
}

/// What building the agent and its fuzz targets takes, and all that `cargo xtask fuzz`
/// needs: it spares a developer who only fuzzes the Go builds of the control plane.
pub fn ensure_rust() -> Result<()> {
    ensure_apt_packages()?;
    ensure_nightly()?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn ensure_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    progress(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The pinned nightly that builds the eBPF object, named by mesh-ebpf/rust-toolchain.toml.
pub fn ebpf_toolchain() -> Result<String> {
    let file = crate::workspace().join("mesh-ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    mesh_common::toolchain_channel(&text)
        .map(str::to_owned)
        .with_context(|| format!("{} names no channel", file.display()))
}

/// Installs the pinned nightly with the components the eBPF build and lint need.
fn ensure_nightly() -> Result<()> {
    let toolchain = ebpf_toolchain()?;
    let out = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            &toolchain,
        ])
        .output()
        .context("running rustup (is Rust installed through rustup?)")?;
    let installed = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && NIGHTLY_COMPONENTS.iter().all(|c| installed.contains(c)) {
        return Ok(());
    }
    progress(&format!(
        "installing the {toolchain} toolchain for the eBPF programs"
    ));
    run(Command::new("rustup")
        .args(["toolchain", "install", &toolchain, "--profile", "minimal"])
        .args(["--component", &NIGHTLY_COMPONENTS.join(",")]))
}

fn ensure_bpf_linker() -> Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if current.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    progress(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    ));
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
}

/// cargo-fuzz goes to ~/.cargo/bin, where the pinned nightly's cargo finds it as a
/// subcommand; the stable toolchain builds it, as it builds bpf-linker.
fn ensure_cargo_fuzz() -> Result<()> {
    let current = Command::new("cargo").args(["fuzz", "--version"]).output();
    if current.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    progress(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (a minute or two)"
    ));
    run(Command::new(env!("CARGO")).args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}
