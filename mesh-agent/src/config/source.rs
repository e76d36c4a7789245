//! Where the cluster configuration comes from: one seam, [`ConfigSource`], that the
//! agent polls for a new configuration, and the watched directory of YAML files behind
//! it (the Kubernetes API source is `kube_api`; `origin` chooses between them).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use tokio::sync::Notify;

use crate::config::{load_path, ClusterConfig, ConfigError};

/// A source of configuration the agent polls.
pub trait ConfigSource: Send {
    /// A description for status and logs (a path, an API server).
    fn describe(&self) -> String;

    /// The configuration, when it changed since the last call (always on the first);
    /// `None` when nothing changed.
    fn poll(&mut self) -> Option<Result<ClusterConfig, ConfigError>>;

    /// Notified when the source may have a new configuration, so that it is polled at
    /// once rather than at the next tick; `None` for a source only polling finds changes
    /// in (a directory).
    fn changes(&self) -> Option<Arc<Notify>> {
        None
    }
}

/// A directory of Kubernetes-format YAML files, read again when a file's name, size or
/// modification time changes.
pub struct DirectorySource {
    dir: PathBuf,
    fingerprint: Option<Vec<(PathBuf, SystemTime, u64)>>,
}

impl DirectorySource {
    pub fn new(dir: &Path) -> DirectorySource {
        DirectorySource {
            dir: dir.to_owned(),
            fingerprint: None,
        }
    }
}

impl ConfigSource for DirectorySource {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn poll(&mut self) -> Option<Result<ClusterConfig, ConfigError>> {
        let fingerprint = fingerprint(&self.dir);
        if self.fingerprint.as_ref() == Some(&fingerprint) {
            return None;
        }
        self.fingerprint = Some(fingerprint);
        Some(load_path(&self.dir))
    }
}

/// Names, modification times and sizes of the files: a change to any means reload.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), meta.modified().ok()?, meta.len()))
        })
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_read_first_and_again_only_when_a_file_changes() {
        let dir = std::env::temp_dir().join(format!("mesh-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let pod = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
        std::fs::write(dir.join("a.yaml"), pod).expect("write");
        let mut source = DirectorySource::new(&dir);
        let first = source.poll().expect("first poll reads").expect("valid");
        assert_eq!(first.namespaces.len(), 1);
        assert!(source.poll().is_none(), "unchanged");
        std::fs::write(dir.join("b.yaml"), pod.replace("shop", "ops")).expect("write");
        let second = source.poll().expect("a new file is read").expect("valid");
        assert_eq!(second.namespaces.len(), 2);
        assert!(source.poll().is_none());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
