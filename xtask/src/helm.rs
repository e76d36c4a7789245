//! helm, for `helm lint` and `helm template` of the mesh's chart (`deploy/chart`): built
//! from its published Go module through the project's module `xtask/go/helm`, which pins
//! it, and cached per version (`go_build`).

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{go_build::GoBuild, workspace};

/// The namespace the chart is rendered for, as the README installs it.
pub const NAMESPACE: &str = "mesh-system";

/// The helm release the chart is checked with.
pub const HELM_VERSION: &str = "v4.3.2";
const PACKAGE: &str = "helm.sh/helm/v4/cmd/helm";

fn build() -> GoBuild<'static> {
    GoBuild {
        what: "helm",
        module: "xtask/go/helm",
        binaries: &[("helm", PACKAGE)],
        cache_name: format!("helm-{HELM_VERSION}"),
        // What helm's own build stamps, so that `helm version` names the release.
        ldflags: format!("-s -w -X helm.sh/helm/v4/internal/version.version={HELM_VERSION}"),
        minutes: 5,
    }
}

/// Checks that `go_mod` (the text of xtask/go/helm/go.mod) builds [`HELM_VERSION`].
fn check_pin(go_mod: &str) -> Result<(), String> {
    let has = |line: &str| go_mod.lines().any(|l| l.trim().starts_with(line));
    let pin = format!("helm.sh/helm/v4 {HELM_VERSION}");
    if !has(&pin) {
        return Err(format!("go.mod does not require {pin}"));
    }
    if !has(&format!("tool {PACKAGE}")) {
        return Err(format!("go.mod does not declare tool {PACKAGE}"));
    }
    Ok(())
}

/// The cached helm binary.
pub fn binary() -> PathBuf {
    build().dir().join("helm")
}

/// Builds helm unless its versioned directory already holds it.
pub fn ensure() -> Result<()> {
    let build = build();
    if binary().is_file() {
        return Ok(());
    }
    check_pin(&build.go_mod()?).map_err(|e| anyhow::anyhow!("{}/go.mod: {e}", build.module))?;
    build.ensure()
}

fn helm(args: &[&str]) -> Result<String> {
    let out = Command::new(binary())
        .args(args)
        .current_dir(workspace())
        .output()
        .with_context(|| format!("running {}", binary().display()))?;
    if !out.status.success() {
        bail!(
            "helm {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm lint --strict` of the chart, with `values` (`--set` arguments).
pub fn lint(values: &[String]) -> Result<()> {
    let mut args = vec!["lint", "--strict", "deploy/chart", "--namespace", NAMESPACE];
    args.extend(values.iter().map(String::as_str));
    helm(&args).map(|_| ())
}

/// The chart's manifests for a release `mesh` in [`NAMESPACE`], with `extra` arguments.
pub fn template(extra: &[String]) -> Result<String> {
    let mut args = vec!["template", "mesh", "deploy/chart", "--namespace", NAMESPACE];
    args.extend(extra.iter().map(String::as_str));
    helm(&args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_pins_the_helm_release_it_is_cached_under() {
        assert_eq!(check_pin(&build().go_mod().expect("go.mod")), Ok(()));
        let other = "require helm.sh/helm/v4 v4.2.0\ntool helm.sh/helm/v4/cmd/helm\n";
        assert!(check_pin(other).is_err_and(|e| e.contains("v4.3.2")));
    }
}
