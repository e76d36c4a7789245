//! Building third-party programs from their published Go modules, through a module of
//! the project's under `xtask/go/` that pins them: into a versioned cache directory, kept
//! across checkouts, written whole or not at all. Only the first setup on a machine pays
//! for a build; the project itself stays Rust.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result};

use crate::{progress, run, run_visible, workspace};

/// One pinned build: what it is called in messages, where its module is, which binaries
/// it makes from which packages, and where they are cached.
pub struct GoBuild<'a> {
    /// For messages: "Jaeger v1.75.0".
    pub what: &'a str,
    /// The project's module, relative to the workspace (`xtask/go/helm`).
    pub module: &'a str,
    /// Each binary's name and the package it is built from.
    pub binaries: &'a [(&'a str, &'a str)],
    /// The cache directory's name (`helm-v4.3.2`): it names every version it holds.
    pub cache_name: String,
    /// Linker flags: `-s -w` and the version stamps the program's own build sets.
    pub ldflags: String,
    /// How long a cold build takes on two cores, for the message.
    pub minutes: u32,
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

impl GoBuild<'_> {
    /// Where the binaries of this build are cached.
    pub fn dir(&self) -> PathBuf {
        cache_root().join("mesh").join(&self.cache_name)
    }

    /// The project's module directory.
    pub fn module_dir(&self) -> PathBuf {
        workspace().join(self.module)
    }

    /// The text of the module's go.mod, for the caller's check of its pins.
    pub fn go_mod(&self) -> Result<String> {
        let path = self.module_dir().join("go.mod");
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Builds the binaries unless the versioned directory already holds them all.
    pub fn ensure(&self) -> Result<()> {
        let dir = self.dir();
        if self
            .binaries
            .iter()
            .all(|(name, _)| dir.join(name).is_file())
        {
            return Ok(());
        }
        run(Command::new("go").arg("version"))
            .with_context(|| format!("Go 1.26 or newer is needed to build {}", self.what))?;
        progress(&format!(
            "building {} from its Go modules (once per machine; about {} minutes on 2 cores)",
            self.what, self.minutes
        ));
        let started = Instant::now();
        // Built beside the final directory and renamed into place, so that an interrupted
        // build never leaves a directory that looks complete.
        let partial = dir.with_extension("partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial)
                .with_context(|| format!("removing {}", partial.display()))?;
        }
        std::fs::create_dir_all(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        for (name, package) in self.binaries {
            // Niced: the build takes both cores for minutes on a machine others share.
            run_visible(
                Command::new("nice")
                    .args(["-n", "10", "go", "build", "-trimpath"])
                    .args(["-ldflags", &self.ldflags, "-o"])
                    .arg(partial.join(name))
                    .arg(package)
                    .current_dir(self.module_dir())
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
            "built {} into {} in {} s",
            self.what,
            dir.display(),
            started.elapsed().as_secs()
        ));
        Ok(())
    }
}
