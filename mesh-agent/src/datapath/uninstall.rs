//! Taking the mesh off a node (`meshctl uninstall`), once its agent is stopped: the pinned
//! links go first (with no agent holding them, each program detaches as its last link
//! goes), then the pinned maps, then the policy route and its rule, so that pods talk
//! directly again. Everything of every map layout is removed, an older release's too;
//! nothing the mesh did not create is touched.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use mesh_common::CAPTURE_ROUTE_TABLE;

use super::{run_ip, DatapathError};

/// What an uninstall removed, and what it left because the mesh did not make it.
#[derive(Debug, Default, serde::Serialize)]
pub struct Uninstalled {
    /// Pinned links removed: each detached a program from a pod's veth or cgroup.
    pub links: Vec<PathBuf>,
    /// Pinned maps removed.
    pub maps: Vec<PathBuf>,
    /// Policy routing rules removed (the capture mark's).
    pub rules: usize,
    /// Whether the capture route table held routes that were flushed.
    pub routes_flushed: bool,
    /// Entries of the bpffs directory that are not the mesh's, left in place.
    pub left: Vec<PathBuf>,
}

/// What a directory of the agent's bpffs directory holds, by its name.
#[derive(Debug, PartialEq, Eq)]
enum Pinned {
    Links,
    Maps,
    Foreign,
}

/// `links-v<N>` and `maps-v<N>` are the agent's (`datapath::links_dir`, `maps_dir`).
fn classify(name: &str) -> Pinned {
    let versioned = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
    };
    if versioned("links-v") {
        Pinned::Links
    } else if versioned("maps-v") {
        Pinned::Maps
    } else {
        Pinned::Foreign
    }
}

/// The pin directories under `bpffs` of map layouts other than `current` (an earlier or
/// later release's), link directories first.
pub(super) fn other_layouts(bpffs: &Path, current: u32) -> Vec<PathBuf> {
    let ours = [format!("links-v{current}"), format!("maps-v{current}")];
    let mut dirs: Vec<(Pinned, PathBuf)> = fs::read_dir(bpffs)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let kind = classify(&name);
            (kind != Pinned::Foreign && !ours.contains(&name)).then(|| (kind, e.path()))
        })
        .collect();
    dirs.sort_by_key(|(kind, path)| (*kind != Pinned::Links, path.clone()));
    dirs.into_iter().map(|(_, path)| path).collect()
}

/// Removes a pin directory and what it holds (links detach, maps go with their last user).
pub(super) fn remove_pin_dir(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let removed = remove_pins(dir)?;
    fs::remove_dir(dir).map_err(|e| bpffs_error(dir, &e))?;
    Ok(removed)
}

/// Removes the mesh's pins under `bpffs` and its policy routing in this network namespace.
pub fn uninstall(bpffs: &Path) -> Result<Uninstalled, DatapathError> {
    let mut done = remove_mesh_pins(bpffs)?;
    let (rules, routes_flushed) = remove_capture_route()?;
    done.rules = rules;
    done.routes_flushed = routes_flushed;
    Ok(done)
}

/// Removes the link and map pins of every layout under `bpffs`, links first, and `bpffs`
/// itself when nothing else is in it.
fn remove_mesh_pins(bpffs: &Path) -> Result<Uninstalled, DatapathError> {
    let mut done = Uninstalled::default();
    let mut dirs: Vec<(Pinned, PathBuf)> = match fs::read_dir(bpffs) {
        Ok(entries) => entries
            .flatten()
            .map(|e| (classify(&e.file_name().to_string_lossy()), e.path()))
            .collect(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(bpffs_error(bpffs, &err)),
    };
    // Links before maps: a program detached never runs on a map about to go.
    dirs.sort_by_key(|(kind, path)| (*kind != Pinned::Links, path.clone()));
    for (kind, dir) in dirs {
        let removed = match kind {
            Pinned::Links => &mut done.links,
            Pinned::Maps => &mut done.maps,
            Pinned::Foreign => {
                done.left.push(dir);
                continue;
            }
        };
        removed.extend(remove_pin_dir(&dir)?);
    }
    if done.left.is_empty() {
        match fs::remove_dir(bpffs) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(bpffs_error(bpffs, &err)),
        }
    }
    Ok(done)
}

fn remove_pins(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let mut removed = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| bpffs_error(dir, &e))?;
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        fs::remove_file(&path).map_err(|e| bpffs_error(&path, &e))?;
        removed.push(path);
    }
    Ok(removed)
}

fn bpffs_error(path: &Path, err: &io::Error) -> DatapathError {
    DatapathError::Bpffs(format!("removing {}: {err}", path.display()))
}

/// Deletes every rule that sends the capture mark to the mesh's table, and the table's
/// routes; returns how many rules went and whether the table held anything.
fn remove_capture_route() -> Result<(usize, bool), DatapathError> {
    let table = CAPTURE_ROUTE_TABLE.to_string();
    let rules = run_ip(&["-4", "rule", "show", "table", &table])?;
    let count = rules.lines().filter(|l| !l.trim().is_empty()).count();
    for _ in 0..count {
        run_ip(&["-4", "rule", "del", "table", &table])?;
    }
    let routes = run_ip(&["-4", "route", "show", "table", &table])?;
    let flushed = !routes.trim().is_empty();
    if flushed {
        run_ip(&["-4", "route", "flush", "table", &table])?;
    }
    Ok((count, flushed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_versioned_pin_directories_are_the_meshs() {
        assert_eq!(classify("links-v6"), Pinned::Links);
        assert_eq!(classify("maps-v12"), Pinned::Maps);
        assert_eq!(classify("maps-v"), Pinned::Foreign);
        assert_eq!(classify("maps-v6-old"), Pinned::Foreign);
        assert_eq!(classify("cilium"), Pinned::Foreign);
    }

    #[test]
    fn other_layouts_are_every_versioned_directory_but_this_one_links_first() {
        let root = std::env::temp_dir().join(format!("mesh-layouts-{}", std::process::id()));
        for dir in ["maps-v5", "links-v5", "maps-v6", "links-v6", "other"] {
            fs::create_dir_all(root.join(dir)).expect("mkdir");
        }
        assert_eq!(
            other_layouts(&root, 6),
            [root.join("links-v5"), root.join("maps-v5")]
        );
        fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn pins_of_every_layout_go_and_what_is_not_the_meshs_stays() {
        let root = std::env::temp_dir().join(format!("mesh-uninstall-{}", std::process::id()));
        for dir in ["links-v5", "maps-v5", "maps-v6", "other"] {
            fs::create_dir_all(root.join(dir)).expect("mkdir");
        }
        fs::write(root.join("links-v5/demo_web@7@tc-from"), "").expect("pin");
        fs::write(root.join("maps-v6/MESH_WORKLOADS"), "").expect("pin");
        fs::write(root.join("other/keep"), "").expect("other");

        let done = remove_mesh_pins(&root).expect("uninstall");
        assert_eq!(done.links, [root.join("links-v5/demo_web@7@tc-from")]);
        assert_eq!(done.maps, [root.join("maps-v6/MESH_WORKLOADS")]);
        assert_eq!(done.left, [root.join("other")]);
        for dir in ["links-v5", "maps-v5", "maps-v6"] {
            assert!(!root.join(dir).exists(), "{dir}");
        }
        assert!(root.join("other/keep").exists());

        fs::remove_dir_all(root.join("other")).expect("cleanup");
        let again = remove_mesh_pins(&root).expect("uninstall");
        assert!(again.links.is_empty() && again.maps.is_empty() && again.left.is_empty());
        assert!(!root.exists(), "an emptied directory goes too");
        assert!(
            remove_mesh_pins(&root).is_ok(),
            "nothing left to remove is fine"
        );
    }
}
