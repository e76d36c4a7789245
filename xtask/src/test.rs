//! `cargo xtask test`: every check, in the order that fails fastest — formatting, lints,
//! the build, the fuzz targets run briefly (`cargo xtask fuzz --quick`), unit tests, the
//! eBPF tests (BPF_PROG_TEST_RUN, real sockets in a cgroup, capture in
//! namespaces), the sandbox integration tests, the Kubernetes manifests against the
//! Kubernetes schemas, and the arm64 build run under qemu-user.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::{bench, cross, fuzz, progress, require_root, run_visible, sandbox, setup, workspace};

const KUBERNETES_VERSION: &str = "1.30";

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
    // After the workspace's build, whose eBPF object the fuzz build reuses, and before the
    // long tests: a target that no longer builds or a property that no longer holds
    // fails within minutes.
    fuzz::run_targets(fuzz::Mode::Quick, None)?;
    // The sandbox tests own the machine-wide sandbox; start from a clean slate.
    sandbox::down()?;
    progress("unit, eBPF and sandbox tests");
    run_visible(cargo().args(["test", "--release", "--workspace", "--", "--test-threads=1"]))?;
    progress("Kubernetes manifests against the Kubernetes schemas");
    validate_manifests()?;
    crate::build(cross::Arch::Arm64)?;
    progress("the benchmark harness, quick mode (no timing is asserted)");
    bench::run(true, false, false)?;
    check_bench_report()?;
    progress("all tests passed");
    Ok(())
}

/// The chart's values the suite renders: the defaults, and each choice the other way.
const CHART_VALUES: [(&str, &[&str]); 2] = [
    ("defaults", &[]),
    (
        "flipped",
        &[
            "--set",
            "agent.configSource=dir,defaultEnrollment=ambient,namespace.create=false",
            "--set",
            "ca.address=ca.example.internal:15012,image.tag=0.2.0,agent.maxSurge=0,agent.maxUnavailable=10%",
        ],
    ),
];

/// Validates deploy/*.yaml and the rendered chart with kubernetes-validate (PyPI), in a
/// virtualenv under target/, after `helm lint --strict`.
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
    let mut manifests: Vec<_> = std::fs::read_dir(workspace().join("deploy"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    // The chart, linted and rendered with its defaults and with every choice flipped.
    let rendered_dir = workspace().join("target/chart");
    std::fs::create_dir_all(&rendered_dir)?;
    for (name, values) in CHART_VALUES {
        let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        crate::helm::lint(&values)?;
        let path = rendered_dir.join(format!("{name}.yaml"));
        std::fs::write(&path, crate::helm::template(&values)?)?;
        manifests.push(path);
    }
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

/// The quick benchmark's report (`target/bench/latest.json`) holds every figure with a
/// plausible value (see [`check_report`]). No timing is asserted: the machine is shared.
fn check_bench_report() -> Result<()> {
    let path = workspace().join("target/bench/latest.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    check_report(&report)
}

/// Every figure of [`bench::expected_figures`] appears once, labelled, with a finite mesh
/// value that can be right: throughputs, rates, latencies, memory and program costs
/// above zero (a zero is a scenario that measured nothing), CPU per request not below
/// zero (a spliced flow may cost the agents no tick), baselines and ratios above zero
/// where a baseline is measured, spreads not below zero, and latency percentiles in
/// order. Each problem names the scenario, the path and the field.
fn check_report(report: &serde_json::Value) -> Result<()> {
    use std::collections::BTreeMap;
    let mut problems = Vec::new();
    if report["machine"]["cpus"].as_u64().unwrap_or(0) == 0 {
        problems.push("machine.cpus: not a positive count".to_owned());
    }
    let results = report["results"].as_array().map_or(&[][..], Vec::as_slice);
    let mut by_figure: BTreeMap<(&str, &str, &str), Vec<&serde_json::Value>> = BTreeMap::new();
    for result in results {
        let label = |key: &str| result[key].as_str().unwrap_or("");
        by_figure
            .entry((label("scenario"), label("path"), label("metric")))
            .or_default()
            .push(result);
    }
    let expected = bench::expected_figures();
    for (figure, found) in &by_figure {
        if !expected.contains(figure) {
            problems.push(format!(
                "{} {} {}: not a figure the benchmark reports ({} results)",
                figure.0,
                figure.1,
                figure.2,
                found.len()
            ));
        }
    }
    let mut mesh_values: BTreeMap<(&str, &str, &str), f64> = BTreeMap::new();
    for figure @ (scenario, path, metric) in expected {
        let name = format!("{scenario} {path} {metric}");
        let result = match by_figure.get(&figure).map(Vec::as_slice) {
            Some([result]) => *result,
            Some(several) => {
                problems.push(format!("{name}: {} results, expected one", several.len()));
                continue;
            }
            None => {
                problems.push(format!("{name}: missing"));
                continue;
            }
        };
        let number = |key: &str| result[key].as_f64().filter(|v| v.is_finite());
        if !result["unit"].is_string() {
            problems.push(format!("{name}: unit: missing"));
        }
        let cpu = scenario == "agent-cpu";
        match number("mesh") {
            Some(v) if v > 0.0 || (cpu && v >= 0.0) => {
                mesh_values.insert(figure, v);
            }
            Some(v) => problems.push(format!("{name}: mesh: {v} is not plausible")),
            None => problems.push(format!("{name}: mesh: not a finite number")),
        }
        match number("mesh_spread") {
            Some(v) if v >= 0.0 => {}
            _ => problems.push(format!("{name}: mesh_spread: not a number >= 0")),
        }
        let compared = bench::has_baseline(scenario);
        for (key, minimum_exclusive) in [
            ("baseline", true),
            ("ratio", true),
            ("baseline_spread", false),
        ] {
            let value = &result[key];
            let ok = if compared {
                number(key).is_some_and(|v| if minimum_exclusive { v > 0.0 } else { v >= 0.0 })
            } else {
                value.is_null()
            };
            if !ok {
                let wanted = match (compared, minimum_exclusive) {
                    (false, _) => "null (no baseline)",
                    (true, true) => "a number > 0",
                    (true, false) => "a number >= 0",
                };
                problems.push(format!("{name}: {key}: {value}, expected {wanted}"));
            }
        }
    }
    // Percentiles of one run can only grow with the rank, and so can their medians.
    let runs: std::collections::BTreeSet<(&str, &str)> =
        mesh_values.keys().map(|(s, p, _)| (*s, *p)).collect();
    for (scenario, path) in runs {
        let ranked: Vec<(&str, f64)> = ["p50", "p90", "p99", "p99.9"]
            .into_iter()
            .filter_map(|rank| Some((rank, *mesh_values.get(&(scenario, path, rank))?)))
            .collect();
        for pair in ranked.windows(2) {
            let ((lower, low), (higher, high)) = (pair[0], pair[1]);
            if low > high {
                problems.push(format!(
                    "{scenario} {path}: {lower} ({low}) above {higher} ({high})"
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "the benchmark report is incomplete or implausible:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    /// A report as a complete quick run writes it, with plausible values.
    fn complete() -> Value {
        let results: Vec<Value> = bench::expected_figures()
            .into_iter()
            .map(|(scenario, path, metric)| {
                let mesh = match metric {
                    "p50" => 0.5,
                    "p90" => 0.9,
                    "p99" => 1.5,
                    "p99.9" => 3.0,
                    _ => 100.0,
                };
                let compared = bench::has_baseline(scenario);
                json!({
                    "scenario": scenario, "path": path, "metric": metric, "unit": "x",
                    "mesh": mesh, "mesh_spread": 0.1,
                    "baseline": if compared { json!(mesh / 2.0) } else { Value::Null },
                    "ratio": if compared { json!(2.0) } else { Value::Null },
                    "baseline_spread": if compared { json!(0.0) } else { Value::Null },
                })
            })
            .collect();
        json!({"machine": {"cpus": 2}, "quick": true, "results": results})
    }

    /// `report` with the result of `figure` changed by `edit`.
    fn with(figure: (&str, &str, &str), edit: impl FnOnce(&mut Value)) -> Value {
        let mut report = complete();
        let result = report["results"]
            .as_array_mut()
            .expect("results")
            .iter_mut()
            .find(|r| {
                (
                    r["scenario"].as_str(),
                    r["path"].as_str(),
                    r["metric"].as_str(),
                ) == (Some(figure.0), Some(figure.1), Some(figure.2))
            })
            .expect("the figure is in the complete report");
        edit(result);
        report
    }

    fn problems(report: &Value) -> String {
        check_report(report)
            .expect_err("the check refuses the report")
            .to_string()
    }

    #[test]
    fn a_complete_plausible_report_passes() {
        check_report(&complete()).expect("complete report");
        // The agents may spend no measurable CPU on flows the kernel carries.
        let idle_agents = with(("agent-cpu", "same-node-l4", "cpu-per-request"), |r| {
            r["mesh"] = json!(0.0)
        });
        check_report(&idle_agents).expect("zero CPU per request");
    }

    #[test]
    fn every_figure_the_benchmark_reports_is_required() {
        let figures = bench::expected_figures();
        // 6 paths × (2 latency scenarios × 4 percentiles + keep-alive + CPU of all
        // agents and of the busiest + 3 churn figures), 4 L4 paths × 2 throughput
        // scenarios, request telemetry's cost, 2 memory figures, 3 programs, 6 of the
        // scale scenarios (idle connections, after they close, sustained churn: 2 each)
        // and 4 of the API scale scenario.
        assert_eq!(
            figures.len(),
            6 * (8 + 1 + 2 + 3) + 4 * 2 + 1 + 2 + 3 + 6 + 4
        );
        let mut report = complete();
        report["results"]
            .as_array_mut()
            .expect("results")
            .retain(|r| {
                !(r["scenario"] == "connection-churn"
                    && r["path"] == "l7-policy"
                    && r["metric"] == "p99")
            });
        assert_eq!(problems(&report), "the benchmark report is incomplete or implausible:\n  connection-churn l7-policy p99: missing");
    }

    #[test]
    fn a_missing_or_zero_figure_names_its_scenario_and_field() {
        let cases = [
            (
                ("throughput-8-streams", "cross-node-mtls", "throughput"),
                ("mesh", Value::Null),
                "throughput-8-streams cross-node-mtls throughput: mesh: not a finite number",
            ),
            (
                ("throughput-1-stream", "same-node-l4", "throughput"),
                ("mesh", json!(0.0)),
                "throughput-1-stream same-node-l4 throughput: mesh: 0 is not plausible",
            ),
            (
                ("requests-keep-alive", "l7-policy", "requests-per-second"),
                ("baseline", json!(0.0)),
                "requests-keep-alive l7-policy requests-per-second: baseline: 0.0, expected a number > 0",
            ),
            (
                ("connection-churn", "same-node-l4-copied", "connections-per-second"),
                ("ratio", Value::Null),
                "connection-churn same-node-l4-copied connections-per-second: ratio: null, expected a number > 0",
            ),
            (
                ("agent-rss", "per-agent", "under-load"),
                ("mesh", json!(-1.0)),
                "agent-rss per-agent under-load: mesh: -1 is not plausible",
            ),
            (
                ("agent-cpu", "l7-policy", "cpu-per-request"),
                ("mesh", json!(-0.5)),
                "agent-cpu l7-policy cpu-per-request: mesh: -0.5 is not plausible",
            ),
            (
                ("bpf-program-cost", "tc_to_pod", "ns-per-run"),
                ("baseline", json!(1.0)),
                "bpf-program-cost tc_to_pod ns-per-run: baseline: 1.0, expected null (no baseline)",
            ),
            (
                ("latency-http1", "same-node-l4", "p50"),
                ("mesh_spread", json!(-0.1)),
                "latency-http1 same-node-l4 p50: mesh_spread: not a number >= 0",
            ),
        ];
        for (figure, (field, value), expected) in cases {
            let report = with(figure, |r| r[field] = value);
            assert_eq!(
                problems(&report),
                format!("the benchmark report is incomplete or implausible:\n  {expected}"),
                "{figure:?} {field}"
            );
        }
    }

    #[test]
    fn percentiles_out_of_order_are_refused() {
        let report = with(("latency-http2", "cross-node-mtls", "p90"), |r| {
            r["mesh"] = json!(2.0)
        });
        assert_eq!(
            problems(&report),
            "the benchmark report is incomplete or implausible:\n  latency-http2 cross-node-mtls: p90 (2) above p99 (1.5)"
        );
    }

    #[test]
    fn duplicated_unknown_and_machine_problems_are_all_listed() {
        let mut report = complete();
        let results = report["results"].as_array_mut().expect("results");
        let first = results[0].clone();
        results.push(first);
        results.push(json!({"scenario": "throughput-1-stream", "path": "l7-policy", "metric": "throughput", "unit": "Gbit/s", "mesh": 1.0}));
        report["machine"] = json!({});
        let first = &report["results"][0];
        let name = format!(
            "{} {} {}",
            first["scenario"].as_str().expect("scenario"),
            first["path"].as_str().expect("path"),
            first["metric"].as_str().expect("metric")
        );
        assert_eq!(
            problems(&report),
            format!(
                "the benchmark report is incomplete or implausible:\n  machine.cpus: not a positive count\n  throughput-1-stream l7-policy throughput: not a figure the benchmark reports (1 results)\n  {name}: 2 results, expected one"
            )
        );
    }
}
