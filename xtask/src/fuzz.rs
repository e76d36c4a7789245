//! `cargo xtask fuzz`: the libFuzzer targets of mesh-agent's parsers (mesh-agent/fuzz, a
//! cargo-fuzz crate of its own workspace), built together with the pinned nightly, then
//! each run for a while on its corpus, seeded from the repository's test data. `cargo
//! xtask test` runs each for a few seconds so that they keep building and running.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{progress, run, run_visible, setup, workspace};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// A fuzz target, the directories (from the workspace root) its corpus is seeded from
/// (libFuzzer reads them recursively and never writes to them), and the dictionary of
/// tokens its mutations splice in, in mesh-agent/fuzz/dicts.
struct Target {
    name: &'static str,
    seeds: &'static [&'static str],
    dict: Option<&'static str>,
}

const TARGETS: [Target; 6] = [
    Target {
        name: "config_loader",
        seeds: &[
            "mesh-agent/tests/testdata/istio",
            "deploy",
            "mesh-agent/fuzz/seeds/config_loader",
        ],
        dict: Some("config_loader.dict"),
    },
    Target {
        name: "request",
        seeds: &["mesh-agent/fuzz/seeds/request"],
        dict: Some("request.dict"),
    },
    Target {
        name: "jwt",
        seeds: &["mesh-agent/tests/testdata/jwt", "mesh-agent/fuzz/seeds/jwt"],
        dict: Some("jwt.dict"),
    },
    Target {
        name: "jwks",
        seeds: &[
            "mesh-agent/tests/testdata/jwt",
            "mesh-agent/fuzz/seeds/jwks",
        ],
        dict: None,
    },
    Target {
        name: "tunnel",
        seeds: &["mesh-agent/fuzz/seeds/tunnel"],
        dict: Some("request.dict"),
    },
    Target {
        name: "ca_csr",
        seeds: &["mesh-agent/fuzz/seeds/ca_csr"],
        dict: None,
    },
];

/// Where the fuzz crate is, and where it builds (apart from the workspace's target).
fn fuzz_dir() -> PathBuf {
    workspace().join("mesh-agent/fuzz")
}

/// `cargo fuzz <args>` with the pinned nightly, from the fuzz crate.
fn cargo_fuzz(subcommand: &str) -> Result<Command> {
    let mut command = Command::new("rustup");
    command
        .current_dir(fuzz_dir())
        .args([
            "run",
            &setup::ebpf_toolchain()?,
            "cargo",
            "fuzz",
            subcommand,
        ])
        .arg("--fuzz-dir")
        .arg(fuzz_dir())
        .arg("--target-dir")
        .arg(fuzz_dir().join("target"))
        // The outer (stable) cargo's settings must not choose the fuzz build's cargo.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    Ok(command)
}

/// Installs cargo-fuzz unless this version is there.
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

/// Builds every target (one cargo invocation: the instrumented dependencies are built
/// once), then runs `only` (or each target) for `seconds`.
pub fn run_targets(seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| only.is_none_or(|name| t.name == name))
        .collect();
    if targets.is_empty() {
        let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        bail!(
            "no fuzz target {:?}; the targets are {}",
            only.unwrap_or_default(),
            names.join(", ")
        );
    }
    setup::ensure()?;
    ensure_cargo_fuzz()?;
    progress("building the fuzz targets (nightly, libFuzzer, AddressSanitizer)");
    run_visible(&mut cargo_fuzz("build")?)?;
    for target in targets {
        progress(&format!("fuzzing {} for {seconds} s", target.name));
        let corpus = fuzz_dir().join("corpus").join(target.name);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut command = cargo_fuzz("run")?;
        command.arg(target.name).arg(&corpus);
        command.args(target.seeds.iter().map(|s| workspace().join(s)));
        command.arg("--");
        if let Some(dict) = target.dict {
            command.arg(format!(
                "-dict={}",
                fuzz_dir().join("dicts").join(dict).display()
            ));
        }
        command.arg(format!("-max_total_time={seconds}"));
        // An input that takes this long is a finding (a hang), not a slow run.
        command.args(["-timeout=10", "-print_final_stats=1"]);
        run_visible(&mut command).with_context(|| {
            format!(
                "fuzz target {} failed; the input is in mesh-agent/fuzz/artifacts/{}/",
                target.name, target.name
            )
        })?;
    }
    Ok(())
}
