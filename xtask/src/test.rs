//! `cargo xtask test`: every check, in the order that fails fastest — formatting, lints,
//! unit tests, the eBPF tests (BPF_PROG_TEST_RUN, real sockets in a cgroup, capture in
//! namespaces), the sandbox integration tests, each fuzz target for a few seconds (so that
//! they keep building), and the Kubernetes manifests against the Kubernetes schemas.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::{bench, fuzz, progress, require_root, run_visible, sandbox, setup, workspace};

const KUBERNETES_VERSION: &str = "1.30";

/// How long `test` runs each fuzz target: enough to load its corpus and mutate a while.
const FUZZ_SECONDS: u64 = 5;

fn cargo() -> Command {
    let mut command = Command::new(env!("CARGO"));
    command.current_dir(workspace());
    command
}

pub fn run() -> Result<()> {
    require_root()?;
    setup::ensure()?;
    progress("cargo fmt --check");
    run_visible(cargo().args(["fmt", "--all", "--check"]))?;
    run_visible(cargo().args(["fmt", "--manifest-path", "mesh-ebpf/Cargo.toml", "--check"]))?;
    run_visible(cargo().args([
        "fmt",
        "--manifest-path",
        "mesh-agent/fuzz/Cargo.toml",
        "--check",
    ]))?;
    progress("cargo clippy -D warnings");
    run_visible(cargo().args([
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    progress("cargo clippy -D warnings (eBPF programs, nightly)");
    run_visible(
        Command::new("rustup")
            .current_dir(workspace().join("mesh-ebpf"))
            .args([
                "run",
                &setup::ebpf_toolchain()?,
                "cargo",
                "clippy",
                "--locked",
                "--release",
            ])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .arg("--target-dir")
            .arg(workspace().join("target/bpf-clippy"))
            .args(["--", "-D", "warnings"])
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"",
            )
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    progress("building");
    run_visible(cargo().args(["build", "--release", "--workspace"]))?;
    // The sandbox tests own the machine-wide sandbox; start from a clean slate.
    sandbox::down()?;
    progress("unit, eBPF and sandbox tests");
    run_visible(cargo().args(["test", "--release", "--workspace", "--", "--test-threads=1"]))?;
    progress("each fuzz target briefly (they keep building; `cargo xtask fuzz` fuzzes)");
    fuzz::run_targets(FUZZ_SECONDS, None)?;
    progress("Kubernetes manifests against the Kubernetes schemas");
    validate_manifests()?;
    progress("the benchmark harness, quick mode (no timing is asserted)");
    bench::run(true, false)?;
    check_bench_report()?;
    progress("all tests passed");
    Ok(())
}

/// Validates deploy/*.yaml with kubernetes-validate (PyPI), in a virtualenv under target/.
fn validate_manifests() -> Result<()> {
    let venv = workspace().join("target/venv");
    let validator = venv.join("bin/kubernetes-validate");
    if !validator.exists() {
        run_visible(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run_visible(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "kubernetes-validate",
        ]))?;
    }
    let manifests: Vec<_> = std::fs::read_dir(workspace().join("deploy"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    if manifests.is_empty() {
        bail!("no manifests in deploy/");
    }
    let mut command = Command::new(&validator);
    command
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(manifests.iter().map(|p| p.as_path()));
    run_visible(&mut command).map_err(|e| {
        e.context(format!(
            "validating manifests in {}",
            Path::new("deploy").display()
        ))
    })
}

/// The quick benchmark's JSON has every scenario, with numbers where numbers belong.
fn check_bench_report() -> Result<()> {
    let text = std::fs::read_to_string(workspace().join("target/bench/latest.json"))?;
    let report: serde_json::Value = serde_json::from_str(&text)?;
    let results = report["results"].as_array().cloned().unwrap_or_default();
    for scenario in [
        "throughput-1-stream",
        "throughput-8-streams",
        "latency-http1",
        "latency-http2",
        "connection-churn",
        "agent-cpu",
        "agent-rss",
        "bpf-program-cost",
    ] {
        if !results.iter().any(|r| r["scenario"] == scenario) {
            bail!("the benchmark report has no {scenario} result");
        }
    }
    for result in &results {
        let mesh_is_number = result["mesh"].as_f64().is_some_and(f64::is_finite);
        let labelled = ["path", "metric", "unit"]
            .iter()
            .all(|k| result[*k].is_string());
        if !mesh_is_number || !labelled {
            bail!("malformed benchmark result: {result}");
        }
    }
    if !report["machine"]["cpus"].is_u64() {
        bail!("the benchmark report does not describe the machine");
    }
    Ok(())
}
