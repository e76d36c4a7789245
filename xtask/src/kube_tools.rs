//! The Kubernetes control plane the sandbox runs — etcd, kube-apiserver and kubectl —
//! built from their published Go modules through the project's module
//! `xtask/go/kube-tools` (which pins k8s.io/kubernetes and the staging modules it
//! replaces) and kept in a versioned cache directory, so that only the first setup on a
//! machine pays for the build.

use std::path::PathBuf;

use anyhow::Result;

use crate::go_build::GoBuild;

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

/// The build of the three binaries at the pinned versions.
fn build() -> GoBuild<'static> {
    GoBuild {
        what: "etcd, kube-apiserver and kubectl",
        module: "xtask/go/kube-tools",
        binaries: &BINARIES,
        cache_name: format!("kube-tools-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}"),
        ldflags: version_ldflags(),
        minutes: 15,
    }
}

/// Where the binaries of these versions are cached.
pub fn dir() -> PathBuf {
    build().dir()
}

/// The path of one of the cached binaries (`etcd`, `kube-apiserver`, `kubectl`).
pub fn binary(name: &str) -> PathBuf {
    dir().join(name)
}

/// Builds the binaries unless their versioned directory already holds them all, after
/// checking that go.mod pins what the constants name (a mismatch would cache binaries
/// under the wrong version).
pub fn ensure() -> Result<()> {
    let build = build();
    if BINARIES
        .iter()
        .all(|(name, _)| build.dir().join(name).is_file())
    {
        return Ok(());
    }
    check_pins(&build.go_mod()?).map_err(|e| anyhow::anyhow!("{}/go.mod: {e}", build.module))?;
    build.ensure()
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
        let text = build().go_mod().expect("go.mod");
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
