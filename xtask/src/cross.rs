//! The agent and meshctl for each node architecture the image ships: built for the host
//! (amd64) or cross-built for arm64 (aarch64) with Debian's cross gcc as linker and C
//! compiler (ring's assembly), staged in `target/image/<arch>/` where deploy/Containerfile
//! takes them by the builder's `TARGETARCH`, and the arm64 build checked by running it
//! under qemu-user (no arm64 machine here).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{progress, run, run_visible, workspace};

/// A node architecture, by the names container builders give them (`TARGETARCH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The Rust target triple of the binaries.
    pub fn triple(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// Cargo's and the cc crate's settings for building on an amd64 host: none for the
    /// host, the cross gcc for arm64.
    fn build_env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Arch::Amd64 => &[],
            Arch::Arm64 => &[
                (
                    "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                    "aarch64-linux-gnu-gcc",
                ),
                ("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc"),
                ("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar"),
            ],
        }
    }
}

/// The cross toolchain's Debian packages: gcc and the C library for arm64, and qemu-user
/// to run what was built.
pub const ARM64_PACKAGES: [&str; 3] = [
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user",
];

/// The standard library for `arch`'s target in the toolchain that builds the workspace.
pub fn ensure_target(arch: Arch) -> Result<()> {
    if arch == Arch::Amd64 {
        return Ok(());
    }
    let installed = Command::new("rustup")
        .current_dir(workspace())
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup (is Rust installed through rustup?)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|t| t.trim() == arch.triple())
    {
        return Ok(());
    }
    progress(&format!("adding the {} standard library", arch.triple()));
    run(Command::new("rustup")
        .current_dir(workspace())
        .args(["target", "add", arch.triple()]))
}

/// Builds mesh-agent (the eBPF object inside) and meshctl for `arch` in `profile` and
/// stages them in `target/image/<arch>/`; returns that directory.
pub fn build(arch: Arch, profile: &str) -> Result<PathBuf> {
    ensure_target(arch)?;
    progress(&format!(
        "building mesh-agent, meshctl and the eBPF object for {} ({profile})",
        arch.name()
    ));
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(workspace())
        .args(["build", "--profile", profile, "-p", "mesh-agent"]);
    // The host's build stays where the rest of the workspace's is.
    let built = match arch {
        Arch::Amd64 => target_dir().join(profile),
        Arch::Arm64 => {
            cargo
                .args(["--target", arch.triple()])
                .envs(arch.build_env().iter().copied());
            target_dir().join(arch.triple()).join(profile)
        }
    };
    run_visible(&mut cargo)?;
    let staged = target_dir().join("image").join(arch.name());
    std::fs::create_dir_all(&staged)?;
    for binary in ["mesh-agent", "meshctl"] {
        std::fs::copy(built.join(binary), staged.join(binary))
            .with_context(|| format!("staging {}", built.join(binary).display()))?;
    }
    Ok(staged)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Runs arm64 binaries under qemu-user with the cross C library: meshctl prints its
/// release and map layout and the CRDs it generates from the agent's model, and the
/// agent its usage, each checked.
pub fn check_arm64(staged: &Path) -> Result<()> {
    progress("running the arm64 build under qemu-user");
    let qemu = |binary: &str, args: &[&str]| -> Result<String> {
        let out = Command::new("qemu-aarch64")
            .args(["-L", "/usr/aarch64-linux-gnu"])
            .arg(staged.join(binary))
            .args(args)
            .output()
            .context("running qemu-aarch64 (Debian's qemu-user)")?;
        if !out.status.success() {
            bail!(
                "arm64 {binary} {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let version: serde_json::Value = serde_json::from_str(&qemu(
        "meshctl",
        &["--admin", "127.0.0.1:9", "version", "-o", "json"],
    )?)
    .context("arm64 meshctl version -o json")?;
    if version["meshctl"]["version"] != env!("CARGO_PKG_VERSION")
        || version["meshctl"]["maps_layout"] != mesh_common::MAPS_LAYOUT_VERSION
    {
        bail!("arm64 meshctl reports {version}");
    }
    let crds = qemu("meshctl", &["crds"])?;
    if !crds.contains("kind: CustomResourceDefinition") || !crds.contains("virtualservices") {
        bail!("arm64 meshctl crds printed no VirtualService CRD");
    }
    let usage = qemu("mesh-agent", &["run", "--help"])?;
    if !usage.contains("--config-source") {
        bail!("arm64 mesh-agent run --help: {usage}");
    }
    let agent = std::fs::read(staged.join("mesh-agent"))?;
    if !embeds_bpf_object(&agent) {
        bail!("the arm64 mesh-agent holds no eBPF object");
    }
    Ok(())
}

/// Whether `binary` holds a 64-bit little-endian ELF object for the BPF machine (the
/// eBPF programs the agent loads).
fn embeds_bpf_object(binary: &[u8]) -> bool {
    const ELF64_LITTLE_ENDIAN: &[u8] = b"\x7fELF\x02\x01\x01";
    const EM_BPF: [u8; 2] = 247u16.to_le_bytes();
    binary
        .windows(ELF64_LITTLE_ENDIAN.len())
        .enumerate()
        .filter(|(_, window)| *window == ELF64_LITTLE_ENDIAN)
        .any(|(at, _)| binary.get(at + 18..at + 20) == Some(&EM_BPF[..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_embedded_bpf_object_is_told_from_the_binarys_own_header() {
        let mut header = b"\x7fELF\x02\x01\x01".to_vec();
        header.resize(18, 0);
        let mut arm64 = header.clone();
        arm64.extend(183u16.to_le_bytes());
        let mut bpf = header;
        bpf.extend(247u16.to_le_bytes());
        assert!(!embeds_bpf_object(&arm64));
        assert!(embeds_bpf_object(
            &[arm64.clone(), vec![0; 100], bpf].concat()
        ));
        assert!(!embeds_bpf_object(&arm64[..10]));
    }
}
