//! Copying a connection's bytes through the agent — between two sockets, or between a
//! socket and an HBONE stream — and counting them where they pass, so a connection's
//! result has its bytes whether it ends well or not. (Splicing in the kernel, where the
//! agent copies nothing, is `datapath::splice`.)

use std::{
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::{proxy::error::ProxyError, telemetry::result::ByteCounts};

/// Buffer per direction of a copied flow: one read fills a typical socket's burst, so a
/// bulk flow costs few system calls; allocated once per flow and reused.
pub const COPY_BUFFER: usize = 64 * 1024;

/// One end of a connection, counting the bytes that pass it into a connection's
/// [`ByteCounts`].
pub struct Counted<S> {
    inner: S,
    counts: Arc<ByteCounts>,
    /// The client's end: what is read from it was sent towards the workload. The
    /// workload's end counts the other way round.
    client_side: bool,
}

impl<S> Counted<S> {
    pub fn client(inner: S, counts: Arc<ByteCounts>) -> Counted<S> {
        Counted {
            inner,
            counts,
            client_side: true,
        }
    }

    pub fn workload(inner: S, counts: Arc<ByteCounts>) -> Counted<S> {
        Counted {
            inner,
            counts,
            client_side: false,
        }
    }

    fn count(&self, read: bool, bytes: usize) {
        let counter = if read == self.client_side {
            &self.counts.sent
        } else {
            &self.counts.received
        };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.count(true, read);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &polled {
            self.count(false, *written);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways between two byte streams until both directions end.
pub async fn copy_streams<A, B>(a: &mut A, b: &mut B) -> Result<(), ProxyError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await?;
    Ok(())
}

/// Copies both ways between a byte stream and an HBONE stream until both directions end.
pub async fn copy_to_tunnel<T>(
    tcp: &mut T,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> Result<(), ProxyError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(tcp);
    let upstream = async {
        // Read straight into a buffer whose filled part is handed to h2 without a copy;
        // once h2 has written a chunk, `reserve` takes the same allocation back.
        let mut buf = BytesMut::with_capacity(COPY_BUFFER);
        loop {
            buf.reserve(COPY_BUFFER);
            if reader.read_buf(&mut buf).await? == 0 {
                send.send_data(Bytes::new(), true)?;
                return Ok::<_, ProxyError>(());
            }
            let mut data = buf.split().freeze();
            while !data.is_empty() {
                send.reserve_capacity(data.len());
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or(h2::Error::from(h2::Reason::CANCEL))??;
                let chunk = data.split_to(granted.min(data.len()));
                send.send_data(chunk, false)?;
            }
        }
    };
    let downstream = async {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk?;
            writer.write_all(&chunk).await?;
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        writer.shutdown().await?;
        Ok::<_, ProxyError>(())
    };
    tokio::try_join!(upstream, downstream)?;
    Ok(())
}
