//! The writers of the node's access logs: lines are appended to a file or stdout off the
//! request path — a full queue drops the line and counts it rather than make a request
//! wait for a disk.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{io::AsyncWriteExt, sync::mpsc};

/// Lines waiting for a writer, per destination; past it lines are dropped (and counted).
const QUEUE_LINES: usize = 4096;

/// The writers of the node's access logs, one per destination (`/dev/stdout` or a file),
/// started on first use.
#[derive(Default)]
pub struct LogWriters {
    writers: Mutex<HashMap<PathBuf, mpsc::Sender<String>>>,
    /// Lines dropped because their writer's queue was full.
    pub dropped: Counter,
    pub written: Counter,
}

impl LogWriters {
    /// Queues `line` for `path`; never waits.
    pub fn write(&self, path: &Path, line: String) {
        let sender = {
            let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
            writers
                .entry(path.to_owned())
                .or_insert_with(|| self.start(path))
                .clone()
        };
        if sender.try_send(line).is_err() {
            self.dropped.inc();
        }
    }

    fn start(&self, path: &Path) -> mpsc::Sender<String> {
        let (send, mut receive) = mpsc::channel::<String>(QUEUE_LINES);
        let (path, written) = (path.to_owned(), self.written.clone());
        tokio::spawn(async move {
            let mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> =
                if path == Path::new("/dev/stdout") {
                    Box::new(tokio::io::stdout())
                } else {
                    let opened = tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .await;
                    match opened {
                        Ok(file) => Box::new(file),
                        Err(err) => {
                            tracing::error!("access log {}: {err}", path.display());
                            return;
                        }
                    }
                };
            while let Some(line) = receive.recv().await {
                let mut batch = line;
                while let Ok(more) = receive.try_recv() {
                    batch.push_str(&more);
                }
                let lines = batch.matches('\n').count() as u64;
                if let Err(err) = out.write_all(batch.as_bytes()).await {
                    tracing::warn!("access log {}: {err}", path.display());
                    continue;
                }
                let _ = out.flush().await;
                written.inc_by(lines);
            }
        });
        send
    }
}
