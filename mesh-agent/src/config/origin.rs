//! Which source the cluster is read from (`--config-source`), and opening it: the
//! directory of YAML files or the Kubernetes API, behind the one [`ConfigSource`] seam.

use std::path::Path;

use crate::config::{
    kube_api::{KubeSource, KubeSourceError},
    source::{ConfigSource, DirectorySource},
};

/// Where the cluster is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// A directory of YAML files (a ConfigMap on Kubernetes).
    Dir,
    /// The Kubernetes API.
    Kube,
}

/// Opens the source `kind` names: the directory `dir`, or the Kubernetes API with the
/// kubeconfig (the in-cluster ServiceAccount without one), once every kind was listed.
pub async fn open(
    kind: SourceKind,
    dir: &Path,
    kubeconfig: Option<&Path>,
) -> Result<Box<dyn ConfigSource>, KubeSourceError> {
    Ok(match kind {
        SourceKind::Dir => Box::new(DirectorySource::new(dir)),
        SourceKind::Kube => Box::new(KubeSource::start(kubeconfig).await?.reporting_events()),
    })
}
