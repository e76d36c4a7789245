//! `meshctl` as scripts use it on a node, without an agent: `check --pre` judging a host
//! (this one, and a host root missing features), `version`, the exit codes that tell a
//! failed check from an unreachable agent, YAML output and shell completions.

use std::{path::Path, process::Command};

fn meshctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        // No agent listens on this port: nothing of the machine's own mesh is asked.
        .args(["--admin", "127.0.0.1:9"])
        .output()
        .expect("meshctl")
}

#[test]
fn check_pre_names_each_missing_feature_and_exits_with_5() {
    let root = std::env::temp_dir().join(format!("meshctl-check-{}", std::process::id()));
    std::fs::create_dir_all(root.join("proc/sys/kernel")).expect("mkdir");
    std::fs::create_dir_all(root.join("proc/self")).expect("mkdir");
    std::fs::write(
        root.join("proc/sys/kernel/osrelease"),
        "5.15.0-91-generic\n",
    )
    .expect("write");
    std::fs::write(
        root.join("proc/self/mounts"),
        "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n",
    )
    .expect("write");
    let out = meshctl(&[
        "check",
        "--pre",
        "--host-root",
        root.to_str().expect("path"),
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(5));
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let failed: Vec<(&str, &str)> = findings
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["ok"] == false)
        .map(|f| {
            (
                f["check"].as_str().expect("check"),
                f["detail"].as_str().expect("detail"),
            )
        })
        .collect();
    let names: Vec<&str> = failed.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["kernel", "btf", "bpffs"]);
    assert!(failed[0].1.contains("5.15.0-91-generic is older than 6.6"));
    assert!(failed[1].1.contains("CONFIG_DEBUG_INFO_BTF"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3 of 4 checks failed"), "{stderr}");
    std::fs::remove_dir_all(&root).expect("cleanup");
}

#[test]
fn check_pre_passes_on_a_host_that_runs_the_mesh() {
    // The test machine runs the eBPF tests, so it has what the mesh needs.
    let out = meshctl(&["check", "--pre"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(Path::new("/sys/kernel/btf/vmlinux").exists());
}

#[test]
fn without_an_agent_check_and_status_say_so_with_their_own_codes() {
    let check = meshctl(&["check", "-o", "json"]);
    assert_eq!(check.status.code(), Some(5));
    let findings: serde_json::Value = serde_json::from_slice(&check.stdout).expect("JSON");
    let agent = findings
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["check"] == "agent")
        .expect("an agent finding");
    assert_eq!(agent["ok"], false);
    assert!(agent["detail"]
        .as_str()
        .is_some_and(|d| d.contains("no mesh agent answers at 127.0.0.1:9")));

    let status = meshctl(&["status"]);
    assert_eq!(status.status.code(), Some(3), "agent unreachable");

    let version = meshctl(&["version", "-o", "json"]);
    assert!(version.status.success());
    let version: serde_json::Value = serde_json::from_slice(&version.stdout).expect("JSON");
    assert_eq!(version["meshctl"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        version["meshctl"]["maps_layout"],
        mesh_common::MAPS_LAYOUT_VERSION
    );
    assert!(version["agent"].is_null());
}

#[test]
fn yaml_output_carries_what_json_does() {
    let json = meshctl(&["version", "-o", "json"]);
    let yaml = meshctl(&["version", "-o", "yaml"]);
    assert!(yaml.status.success());
    let from_json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let from_yaml: serde_json::Value = serde_norway::from_slice(&yaml.stdout).expect("YAML");
    assert_eq!(from_yaml, from_json);
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("maps_layout: "));
}

#[test]
fn completion_scripts_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = meshctl(&["completion", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for command in ["check", "uninstall", "policy", "validate"] {
            assert!(
                script.contains(command),
                "{shell} completion lacks {command}"
            );
        }
    }
    let bad = meshctl(&["completion", "cmd.exe"]);
    assert_eq!(bad.status.code(), Some(2), "invalid input");
}
