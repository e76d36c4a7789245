//! What a node must offer the datapath, checked before the agent loads anything and by
//! `meshctl check`: a kernel with TCX (6.6), BTF, cgroup v2 and bpffs; and, for `meshctl
//! check` only, a CNI whose pods the mesh can find and no other program on the pods'
//! interfaces. The facts are read from a host root (`/`, or where a pod mounts the host)
//! and this network namespace, and judged by pure functions, so a missing feature gets a
//! message that names it and what to do.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use serde::{Deserialize, Serialize};

use crate::datapath::pod_links::{self, CniShape};

/// The oldest kernel with every program attachment the mesh uses: TCX links for tc
/// (6.6); sk_assign at tc ingress (5.7) and socket lookups come before it.
pub const MIN_KERNEL: (u32, u32) = (6, 6);

/// What was read from the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `uname -r`, if it could be read.
    pub kernel_release: Option<String>,
    /// Whether the kernel exposes its BTF (`/sys/kernel/btf/vmlinux`).
    pub btf: bool,
    /// Where cgroup v2 is mounted, if it is.
    pub cgroup2: Option<PathBuf>,
    /// Whether a bpf filesystem is mounted at `/sys/fs/bpf`.
    pub bpffs: bool,
}

/// One requirement and whether the host meets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub check: String,
    pub ok: bool,
    /// What was found, and when not ok, what to do.
    pub detail: String,
}

/// Reads the facts under `root` (`/` on the node itself).
pub fn gather(root: &Path) -> HostFacts {
    let read = |path: &str| fs::read_to_string(root.join(path)).ok();
    let mounts = read("proc/self/mounts").or_else(|| read("proc/mounts"));
    let mounted = |fs_type: &str| {
        mounts.as_deref().and_then(|text| {
            text.lines().find_map(|line| {
                let mut cols = line.split_whitespace();
                let (_, point, kind) = (cols.next()?, cols.next()?, cols.next()?);
                (kind == fs_type).then(|| PathBuf::from(point))
            })
        })
    };
    HostFacts {
        kernel_release: read("proc/sys/kernel/osrelease").map(|r| r.trim().to_owned()),
        btf: root.join("sys/kernel/btf/vmlinux").exists(),
        cgroup2: mounted("cgroup2"),
        bpffs: mounted("bpf").is_some_and(|point| point == Path::new("/sys/fs/bpf")),
    }
}

/// `major.minor` of a kernel release such as `6.8.0-45-generic`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Every requirement, met or not.
pub fn judge(facts: &HostFacts) -> Vec<Finding> {
    let (min_major, min_minor) = MIN_KERNEL;
    let kernel = match facts.kernel_release.as_deref() {
        None => Finding {
            check: "kernel".into(),
            ok: false,
            detail: "cannot read the kernel release (proc/sys/kernel/osrelease)".into(),
        },
        Some(release) => match kernel_version(release) {
            Some(version) if version >= MIN_KERNEL => Finding {
                check: "kernel".into(),
                ok: true,
                detail: format!("{release} (TCX, sk_assign, socket lookups)"),
            },
            Some(_) => Finding {
                check: "kernel".into(),
                ok: false,
                detail: format!(
                    "{release} is older than {min_major}.{min_minor}: the tc programs attach \
                     with TCX links (6.6+); upgrade the node's kernel"
                ),
            },
            None => Finding {
                check: "kernel".into(),
                ok: false,
                detail: format!("cannot read a version in the kernel release {release:?}"),
            },
        },
    };
    let btf = Finding {
        check: "btf".into(),
        ok: facts.btf,
        detail: if facts.btf {
            "/sys/kernel/btf/vmlinux".into()
        } else {
            "no /sys/kernel/btf/vmlinux: the kernel was built without \
             CONFIG_DEBUG_INFO_BTF, which the programs' relocations need"
                .into()
        },
    };
    let cgroup2 = Finding {
        check: "cgroup2".into(),
        ok: facts.cgroup2.is_some(),
        detail: match &facts.cgroup2 {
            Some(point) => format!("mounted at {}", point.display()),
            None => "no cgroup v2 mount: the sockops program attaches to pods' cgroup v2 \
                     directories (boot with systemd.unified_cgroup_hierarchy=1)"
                .into(),
        },
    };
    let bpffs = Finding {
        check: "bpffs".into(),
        ok: facts.bpffs,
        detail: if facts.bpffs {
            "mounted at /sys/fs/bpf".into()
        } else {
            "no bpf filesystem at /sys/fs/bpf: the programs' links and maps are pinned \
             there so they outlive an agent restart (mount -t bpf bpffs /sys/fs/bpf; the \
             agent mounts it when it runs in the host's mount namespace)"
                .into()
        },
    };
    vec![kernel, btf, cgroup2, bpffs]
}

/// Everything `meshctl check` judges of a node: the host under `root` and this network
/// namespace (the node's, where meshctl or the agent runs).
pub fn check_node(root: &Path) -> Vec<Finding> {
    let mut findings = judge(&gather(root));
    findings.extend(judge_network(&gather_network()));
    findings
}

/// A program the kernel runs on a pod's host-side veth at a TCX hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedProgram {
    pub interface: String,
    pub hook: &'static str,
    pub name: String,
    pub id: u32,
}

/// The mesh's own tc programs, by their kernel names.
const OWN_PROGRAMS: [&str; 2] = ["tc_from_pod", "tc_to_pod"];

/// What this network namespace shows: how the CNI wires pods, and the TCX programs on
/// their veths.
#[derive(Debug, Clone)]
pub struct NetworkFacts {
    pub cni: Result<CniShape, String>,
    pub programs: Result<Vec<AttachedProgram>, String>,
}

/// Reads the pods' veths (`ip`) and asks the kernel for the programs at their TCX hooks
/// (root: CAP_BPF and CAP_NET_ADMIN).
pub fn gather_network() -> NetworkFacts {
    let cni = pod_links::survey();
    let programs = match &cni {
        Ok(shape) => attached_programs(shape),
        Err(err) => Err(err.clone()),
    };
    NetworkFacts { cni, programs }
}

fn attached_programs(shape: &CniShape) -> Result<Vec<AttachedProgram>, String> {
    let mut found = Vec::new();
    for veth in shape.veths() {
        for (hook, attach) in [
            ("ingress", TcAttachType::Ingress),
            ("egress", TcAttachType::Egress),
        ] {
            let programs = match SchedClassifier::query_tcx(veth, attach) {
                Ok((_, programs)) => programs,
                Err(err) => {
                    let text = err.to_string();
                    // A pod deleted since the links were read took its veth along.
                    if !std::path::Path::new("/sys/class/net").join(veth).exists() {
                        continue;
                    }
                    return Err(format!(
                        "listing the programs on {veth} {hook}: {text} (this needs root: \
                         CAP_BPF and CAP_NET_ADMIN)"
                    ));
                }
            };
            found.extend(programs.iter().map(|program| AttachedProgram {
                interface: veth.to_owned(),
                hook,
                name: program.name_as_str().unwrap_or("?").to_owned(),
                id: program.id(),
            }));
        }
    }
    Ok(found)
}

/// Whether the mesh can find and attach this node's pods, and whether another program
/// shares their hooks.
pub fn judge_network(facts: &NetworkFacts) -> Vec<Finding> {
    let cni = match &facts.cni {
        Err(err) => Finding {
            check: "cni".into(),
            ok: false,
            detail: format!("cannot read the node's interfaces: {err}"),
        },
        Ok(shape) if !shape.unattachable.is_empty() => Finding {
            check: "cni".into(),
            ok: false,
            detail: format!(
                "{}: neither a /32 route to the pod nor a Linux bridge port, so the mesh \
                 cannot find or attach its pod (supported: a /32 route per pod, as Calico; \
                 or a bridge, as flannel)",
                shape
                    .unattachable
                    .iter()
                    .map(|(veth, master)| format!("{veth} on {master}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        Ok(shape) if shape.routed.is_empty() && shape.bridged.is_empty() => Finding {
            check: "cni".into(),
            ok: true,
            detail: "no pod interface on this node yet".into(),
        },
        Ok(shape) => Finding {
            check: "cni".into(),
            ok: true,
            detail: format!(
                "pod veths: {} routed (a /32 route each), {} on a bridge",
                shape.routed.len(),
                shape.bridged.len()
            ),
        },
    };
    let programs = match &facts.programs {
        Err(err) => Finding {
            check: "programs".into(),
            ok: false,
            detail: err.clone(),
        },
        Ok(programs) => {
            let others: Vec<String> = programs
                .iter()
                .filter(|p| !OWN_PROGRAMS.contains(&p.name.as_str()))
                .map(|p| format!("{} {} {} (id {})", p.interface, p.hook, p.name, p.id))
                .collect();
            if others.is_empty() {
                Finding {
                    check: "programs".into(),
                    ok: true,
                    detail: "no other TCX program on the pods' interfaces".into(),
                }
            } else {
                Finding {
                    check: "programs".into(),
                    ok: false,
                    detail: format!(
                        "other programs on the pods' interfaces: {}. They run at the hooks \
                         of the mesh's tc programs; one that drops or redirects a pod's \
                         packets first takes them past the mesh (another CNI's or mesh's \
                         eBPF data plane)",
                        others.join(", ")
                    ),
                }
            }
        }
    };
    vec![cni, programs]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> HostFacts {
        HostFacts {
            kernel_release: Some("6.8.0-45-generic".into()),
            btf: true,
            cgroup2: Some("/sys/fs/cgroup".into()),
            bpffs: true,
        }
    }

    fn failed(facts: &HostFacts) -> Vec<String> {
        judge(facts)
            .into_iter()
            .filter(|f| !f.ok)
            .map(|f| f.check)
            .collect()
    }

    fn program(interface: &str, hook: &'static str, name: &str) -> AttachedProgram {
        AttachedProgram {
            interface: interface.into(),
            hook,
            name: name.into(),
            id: 7,
        }
    }

    #[test]
    fn pods_the_mesh_cannot_attach_and_programs_beside_its_own_are_named() {
        let shape = CniShape {
            routed: vec!["cali1".into()],
            bridged: vec!["veth2".into()],
            unattachable: Vec::new(),
        };
        let facts = NetworkFacts {
            cni: Ok(shape.clone()),
            programs: Ok(vec![
                program("cali1", "ingress", "tc_from_pod"),
                program("cali1", "egress", "tc_to_pod"),
            ]),
        };
        let findings = judge_network(&facts);
        assert!(findings.iter().all(|f| f.ok), "{findings:?}");
        assert_eq!(
            findings[0].detail,
            "pod veths: 1 routed (a /32 route each), 1 on a bridge"
        );

        let facts = NetworkFacts {
            cni: Ok(CniShape {
                unattachable: vec![("veth3".into(), "ovs-system (openvswitch)".into())],
                ..shape
            }),
            programs: Ok(vec![
                program("cali1", "ingress", "tc_from_pod"),
                program("veth2", "ingress", "cil_from_conta"),
            ]),
        };
        let findings = judge_network(&facts);
        assert!(!findings[0].ok);
        assert!(findings[0]
            .detail
            .starts_with("veth3 on ovs-system (openvswitch): neither"));
        assert!(!findings[1].ok);
        assert!(findings[1].detail.starts_with(
            "other programs on the pods' interfaces: veth2 ingress cil_from_conta (id 7)."
        ));

        let unreadable = NetworkFacts {
            cni: Err("ip: not found".into()),
            programs: Err("ip: not found".into()),
        };
        assert!(judge_network(&unreadable).iter().all(|f| !f.ok));
    }

    #[test]
    fn a_node_with_every_feature_passes() {
        assert!(failed(&node()).is_empty());
        let exactly_min = HostFacts {
            kernel_release: Some("6.6.1".into()),
            ..node()
        };
        assert!(failed(&exactly_min).is_empty());
    }

    #[test]
    fn each_missing_feature_is_named_with_what_to_do() {
        let old = HostFacts {
            kernel_release: Some("5.15.0-100-generic".into()),
            ..node()
        };
        let findings = judge(&old);
        assert_eq!(failed(&old), ["kernel"]);
        assert!(
            findings[0].detail.contains("older than 6.6"),
            "{findings:?}"
        );
        let bare = HostFacts::default();
        assert_eq!(failed(&bare), ["kernel", "btf", "cgroup2", "bpffs"]);
        let odd = HostFacts {
            kernel_release: Some("unknown".into()),
            ..node()
        };
        assert_eq!(failed(&odd), ["kernel"]);
    }

    #[test]
    fn facts_are_read_under_a_host_root() {
        let root = std::env::temp_dir().join(format!("mesh-preflight-{}", std::process::id()));
        fs::create_dir_all(root.join("proc/sys/kernel")).expect("mkdir");
        fs::create_dir_all(root.join("proc/self")).expect("mkdir");
        fs::write(root.join("proc/sys/kernel/osrelease"), "6.12.3\n").expect("write");
        fs::write(
            root.join("proc/self/mounts"),
            "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n",
        )
        .expect("write");
        let facts = gather(&root);
        assert_eq!(
            facts,
            HostFacts {
                kernel_release: Some("6.12.3".into()),
                btf: false,
                cgroup2: Some("/sys/fs/cgroup".into()),
                bpffs: true,
            }
        );
        fs::remove_dir_all(&root).expect("cleanup");
    }
}
