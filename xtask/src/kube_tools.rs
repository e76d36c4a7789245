//! The Kubernetes control plane the sandbox runs — etcd, kube-apiserver and kubectl —
//! built from their published Go modules through the project's module
//! `xtask/go/kube-tools` (which pins k8s.io/kubernetes and the staging modules it
//! replaces) and kept in a versioned cache directory, so that only the first setup on a
//! machine pays for the build.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result};

use crate::{progress, run, run_visible, workspace};

/// The Kubernetes release kube-apiserver and kubectl are built from.
pub const KUBERNETES_VERSION: &str = "v1.37.2";
/// The etcd release: the one k8s.io/kubernetes at [`KUBERNETES_VERSION`] requires.
pub const ETCD_VERSION: &str = "v3.7.0";

/// Each binary and the package it is built from.
const BINARIES: [(&str, &str); 3] = [
    ("etcd", "go.etcd.io/etcd/server/v3"),
    ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
    ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
];

/// The staging modules are published as v0.<minor>.<patch> of the Kubernetes release.
fn staging_version(kubernetes: &str) -> Option<String> {
    let rest = kubernetes.strip_prefix("v1.")?;
    Some(format!("v0.{rest}"))
}

/// Checks that `go_mod` (the text of xtask/go/kube-tools/go.mod) builds what the constants
/// name: k8s.io/kubernetes and etcd at their versions, every `k8s.io/*` replacement at the
/// matching staging version. A mismatch would cache binaries under the wrong version.
fn check_pins(go_mod: &str) -> Result<(), String> {
    let staging = staging_version(KUBERNETES_VERSION)
        .ok_or_else(|| format!("{KUBERNETES_VERSION} is not a v1.x version"))?;
    let has = |line: &str| go_mod.lines().any(|l| l.trim().starts_with(line));
    for pin in [
        format!("k8s.io/kubernetes {KUBERNETES_VERSION}"),
        format!("go.etcd.io/etcd/server/v3 {ETCD_VERSION}"),
    ] {
        if !has(&pin) {
            return Err(format!("go.mod does not require {pin}"));
        }
    }
    let mut replaced = 0;
    for line in go_mod.lines().map(str::trim) {
        let Some((module, target)) = line.split_once("=>") else {
            continue;
        };
        let module = module.trim();
        let expected = format!("{module} {staging}");
        if module.starts_with("k8s.io/") && target.trim() != expected {
            return Err(format!(
                "go.mod replaces {module} with {}, expected {expected}",
                target.trim()
            ));
        }
        replaced += 1;
    }
    if replaced == 0 {
        return Err("go.mod replaces no k8s.io staging module".into());
    }
    Ok(())
}

/// The project's Go module the binaries are built through.
fn module_dir() -> PathBuf {
    workspace().join("xtask/go/kube-tools")
}

/// `$XDG_CACHE_HOME`, else `$HOME/.cache`, else `/var/cache`: kept across checkouts, so
/// every worktree and CI run on a machine shares one build.
pub fn cache_root() -> PathBuf {
    let from_env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    from_env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| from_env("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
}

/// Where the binaries of these versions are cached.
pub fn dir() -> PathBuf {
    cache_root().join("mesh").join(format!(
        "kube-tools-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}"
    ))
}

/// The path of one of the cached binaries (`etcd`, `kube-apiserver`, `kubectl`).
pub fn binary(name: &str) -> PathBuf {
    dir().join(name)
}

/// Builds the binaries unless their versioned directory already holds them all.
pub fn ensure() -> Result<()> {
    let dir = dir();
    if BINARIES.iter().all(|(name, _)| dir.join(name).is_file()) {
        return Ok(());
    }
    let go_mod = module_dir().join("go.mod");
    let text = std::fs::read_to_string(&go_mod)
        .with_context(|| format!("reading {}", go_mod.display()))?;
    check_pins(&text).map_err(|e| anyhow::anyhow!("{}: {e}", go_mod.display()))?;
    run(Command::new("go").arg("version"))
        .context("Go 1.26 or newer is needed to build etcd, kube-apiserver and kubectl")?;
    progress(&format!(
        "building etcd {ETCD_VERSION}, kube-apiserver and kubectl {KUBERNETES_VERSION} from their Go modules (once per machine; about 15 minutes on 2 cores)"
    ));
    let started = Instant::now();
    // Built beside the final directory and renamed into place, so that an interrupted
    // build never leaves a directory that looks complete.
    let partial = dir.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let ldflags = version_ldflags();
    for (name, package) in BINARIES {
        // Niced: the build takes both cores for minutes on a machine others share.
        run_visible(
            Command::new("nice")
                .args(["-n", "10", "go", "build", "-trimpath"])
                .args(["-ldflags", &ldflags, "-o"])
                .arg(partial.join(name))
                .arg(package)
                .current_dir(module_dir())
                .env("CGO_ENABLED", "0")
                // The Go of the machine, never a toolchain download.
                .env("GOTOOLCHAIN", "local"),
        )
        .with_context(|| format!("building {name} from {package}"))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::rename(&partial, &dir).with_context(|| format!("creating {}", dir.display()))?;
    progress(&format!(
        "built the Kubernetes control plane into {} in {} s",
        dir.display(),
        started.elapsed().as_secs()
    ));
    Ok(())
}

/// What Kubernetes' own build stamps into its binaries, so that `kubectl version` and the
/// API server's `/version` name the release rather than `v0.0.0-master`.
fn version_ldflags() -> String {
    let minor = KUBERNETES_VERSION
        .split('.')
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut flags = vec!["-s".to_owned(), "-w".to_owned()];
    for package in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (name, value) in [
            ("gitVersion", KUBERNETES_VERSION),
            ("gitMajor", "1"),
            ("gitMinor", &minor),
        ] {
            flags.push(format!("-X {package}.{name}={value}"));
        }
    }
    flags.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_MOD: &str = "module m\n\nrequire (\n\tgo.etcd.io/etcd/server/v3 v3.7.0 // indirect\n\tk8s.io/kubernetes v1.37.2 // indirect\n)\n\nreplace (\n\tk8s.io/api => k8s.io/api v0.37.2\n\tk8s.io/kubectl => k8s.io/kubectl v0.37.2\n)\n";

    #[test]
    fn the_project_go_mod_pins_the_versions_the_cache_is_named_after() {
        let text = std::fs::read_to_string(module_dir().join("go.mod")).expect("go.mod");
        assert_eq!(check_pins(&text), Ok(()));
    }

    #[test]
    fn pins_are_checked_module_by_module() {
        assert_eq!(check_pins(GO_MOD), Ok(()));
        assert_eq!(
            check_pins(&GO_MOD.replace("kubernetes v1.37.2", "kubernetes v1.36.3")),
            Err("go.mod does not require k8s.io/kubernetes v1.37.2".into())
        );
        assert_eq!(
            check_pins(&GO_MOD.replace("kubectl v0.37.2", "kubectl v0.36.3")),
            Err(
                "go.mod replaces k8s.io/kubectl with k8s.io/kubectl v0.36.3, expected k8s.io/kubectl v0.37.2"
                    .into()
            )
        );
        let without_replacements = GO_MOD.split("replace").next().unwrap_or_default();
        assert_eq!(
            check_pins(without_replacements),
            Err("go.mod replaces no k8s.io staging module".into())
        );
    }

    #[test]
    fn binaries_carry_the_release_they_were_built_from() {
        let flags = version_ldflags();
        assert!(flags.contains("-X k8s.io/component-base/version.gitVersion=v1.37.2"));
        assert!(flags.contains("-X k8s.io/client-go/pkg/version.gitMinor=37"));
        assert_eq!(staging_version("v1.37.2").as_deref(), Some("v0.37.2"));
    }
}
