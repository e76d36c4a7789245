//! `cargo xtask fuzz`: the libFuzzer targets of mesh-agent's parsers (mesh-agent/fuzz, a
//! cargo-fuzz crate of its own workspace), built together with the pinned nightly, then
//! each run for a while on its corpus, seeded from the repository's test data.
//! `cargo xtask fuzz --quick`, a step of `cargo xtask test`, builds them the cheap way and
//! runs each over its seeds and a fixed number of mutations, so that they keep building
//! and their property checks keep holding.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{progress, run_visible, setup, workspace};

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

/// How the targets are built and run.
#[derive(Clone, Copy)]
pub enum Mode {
    /// `cargo xtask fuzz`: optimised, with AddressSanitizer, each target for this long on
    /// its corpus (mesh-agent/fuzz/corpus, kept between runs).
    Fuzz { seconds: u64 },
    /// `cargo xtask fuzz --quick` and `cargo xtask test`: unoptimised and without a
    /// sanitizer (`-s none --dev`), which builds cold in a fraction of the sanitizer
    /// build's time (README "Fuzzing" has the figures) and keeps what the short run can
    /// catch: the targets' property checks, debug assertions and overflow checks in every
    /// crate. Each target runs over its seeds, then mutations up to [`QUICK_RUNS`].
    Quick,
}

/// Executions of each target in quick mode (libFuzzer's `-runs`): all its seeds, then
/// mutations, from a fixed random seed and an empty corpus, so that every machine runs
/// the same inputs and a failure in CI replays locally. Unoptimised, the six runs take
/// about 18 s of CPU in all, half of it `config_loader`'s (107 seeds of YAML).
const QUICK_RUNS: u32 = 1_000;

impl Mode {
    /// The build options of `cargo fuzz build` and `cargo fuzz run` (the same for both,
    /// or `run` would build again).
    fn build_args(self) -> &'static [&'static str] {
        match self {
            Mode::Fuzz { .. } => &[],
            Mode::Quick => &["--sanitizer", "none", "--dev"],
        }
    }
}

/// Where the fuzz crate is.
fn fuzz_dir() -> PathBuf {
    workspace().join("mesh-agent/fuzz")
}

/// Where the fuzz crate builds, apart from the workspace's target.
fn target_dir() -> PathBuf {
    fuzz_dir().join("target")
}

/// `cargo fuzz <subcommand> <build options>` with the pinned nightly, from the fuzz crate.
fn cargo_fuzz(subcommand: &str, mode: Mode) -> Result<Command> {
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
        .args(mode.build_args())
        .arg("--fuzz-dir")
        .arg(fuzz_dir())
        .arg("--target-dir")
        .arg(target_dir())
        // The outer (stable) cargo's settings must not choose the fuzz build's cargo.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    Ok(command)
}

/// Builds every target (one cargo invocation: the instrumented dependencies are built
/// once), then runs `only` (or each target) as `mode` says.
pub fn run_targets(mode: Mode, only: Option<&str>) -> Result<()> {
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
    setup::ensure_rust()?;
    progress(match mode {
        Mode::Fuzz { .. } => "building the fuzz targets (nightly, libFuzzer, AddressSanitizer)",
        Mode::Quick => "building the fuzz targets (nightly, libFuzzer, no sanitizer)",
    });
    run_visible(&mut cargo_fuzz("build", mode)?)?;
    for target in targets {
        let corpus = match mode {
            Mode::Fuzz { seconds } => {
                progress(&format!("fuzzing {} for {seconds} s", target.name));
                fuzz_dir().join("corpus").join(target.name)
            }
            Mode::Quick => {
                progress(&format!(
                    "fuzzing {}: its seeds, then mutations up to {QUICK_RUNS} executions",
                    target.name
                ));
                // Emptied first: what an earlier run learnt would change the inputs.
                let corpus = target_dir().join("quick-corpus").join(target.name);
                if corpus.exists() {
                    std::fs::remove_dir_all(&corpus)
                        .with_context(|| format!("removing {}", corpus.display()))?;
                }
                corpus
            }
        };
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        // libFuzzer writes what it learns to the first directory only.
        let mut command = cargo_fuzz("run", mode)?;
        command.arg(target.name).arg(&corpus);
        command.args(target.seeds.iter().map(|s| workspace().join(s)));
        command.arg("--");
        if let Some(dict) = target.dict {
            command.arg(format!(
                "-dict={}",
                fuzz_dir().join("dicts").join(dict).display()
            ));
        }
        match mode {
            Mode::Fuzz { seconds } => {
                command.arg(format!("-max_total_time={seconds}"));
            }
            Mode::Quick => {
                command.args([format!("-runs={QUICK_RUNS}"), "-seed=1".to_owned()]);
            }
        }
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
