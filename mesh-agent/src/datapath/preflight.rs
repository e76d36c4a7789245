//! What a node must offer the datapath, checked before the agent loads anything and by
//! `meshctl check`: a kernel with TCX (6.6), BTF, cgroup v2 and bpffs. The facts are read
//! from a host root (`/`, or where a pod mounts the host) and judged by a pure function,
//! so a missing feature gets a message that names it and what to do.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

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
