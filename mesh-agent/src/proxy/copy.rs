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

/// An HBONE stream as a byte stream, for an HTTP connection the agent itself speaks over
/// a tunnel (a routed request's upstream, a destination's per-request judge): hyper reads
/// and writes the stream directly, where an in-memory pipe and a task copying it to the
/// tunnel cost a copy and two wake-ups per request. Data is released to the peer's flow
/// control as it is read; the end of the stream is sent on shutdown, or on drop.
pub struct TunnelStream<Held = ()> {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not read yet (first: bytes the caller read ahead).
    pending: Bytes,
    /// The end of the stream was sent.
    ended: bool,
    /// Kept for as long as the stream is in use (its place on a pooled connection).
    _held: Held,
}

impl TunnelStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> TunnelStream {
        TunnelStream::holding(send, recv, ())
    }
}

impl<Held> TunnelStream<Held> {
    pub fn holding(send: SendStream<Bytes>, recv: RecvStream, held: Held) -> TunnelStream<Held> {
        TunnelStream {
            send,
            recv,
            pending: Bytes::new(),
            ended: false,
            _held: held,
        }
    }

    /// Bytes already read from the stream, to be read again first.
    pub fn read_ahead(mut self, prefix: Bytes) -> TunnelStream<Held> {
        self.pending = prefix;
        self
    }

    fn end(&mut self) -> Result<(), h2::Error> {
        if !self.ended {
            self.ended = true;
            self.send.send_data(Bytes::new(), true)?;
        }
        Ok(())
    }
}

fn stream_error(err: h2::Error) -> std::io::Error {
    std::io::Error::other(err)
}

impl<Held: Unpin> AsyncRead for TunnelStream<Held> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            match std::task::ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(err)) => return Poll::Ready(Err(stream_error(err))),
            }
        }
        let taken = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending.split_to(taken));
        Poll::Ready(Ok(()))
    }
}

impl<Held: Unpin> AsyncWrite for TunnelStream<Held> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len());
        // `poll_capacity` announces only capacity granted since it last answered: what
        // the stream holds is read from `capacity`, and `poll_capacity` waits for more.
        loop {
            let granted = this.send.capacity().min(buf.len());
            if granted > 0 {
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..granted]), false)
                    .map_err(stream_error)?;
                return Poll::Ready(Ok(granted));
            }
            match std::task::ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(err)) => return Poll::Ready(Err(stream_error(err))),
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The connection's task writes the frames out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.get_mut().end().map_err(stream_error))
    }
}

impl<Held> Drop for TunnelStream<Held> {
    fn drop(&mut self) {
        // A connection closed without a shutdown still ends its stream cleanly, as the
        // socket it stands for would with a FIN.
        let _ = self.end();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's stream and the server's stream of one request over an in-memory h2
    /// connection, as HBONE carries a tunnel.
    async fn tunnel() -> (TunnelStream, TunnelStream) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.expect("server");
            let (request, mut respond) = connection
                .accept()
                .await
                .expect("a stream")
                .expect("a request");
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("response");
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            TunnelStream::new(send, request.into_body())
        });
        let (sender, connection) = h2::client::handshake(client_io).await.expect("client");
        tokio::spawn(connection);
        let mut sender = sender.ready().await.expect("ready");
        let (response, send) = sender
            .send_request(http::Request::new(()), false)
            .expect("request");
        let server_end = server.await.expect("server task");
        let recv = response.await.expect("response").into_body();
        (TunnelStream::new(send, recv), server_end)
    }

    #[tokio::test]
    async fn bytes_cross_a_tunnel_stream_both_ways_and_its_end_reads_as_eof() {
        let (mut client, server) = tunnel().await;
        let mut server = server.read_ahead(Bytes::from_static(b"ahead "));
        // More than the default 64 KiB window: flow control must be released as read.
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let writing = {
            let sent = sent.clone();
            tokio::spawn(async move {
                client.write_all(&sent).await.expect("write");
                client.shutdown().await.expect("shutdown");
                let mut answer = Vec::new();
                client.read_to_end(&mut answer).await.expect("read");
                answer
            })
        };
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.expect("read");
        assert_eq!(&received[..6], b"ahead ");
        assert!(
            received[6..] == sent[..],
            "the bytes arrive in order, all of them"
        );
        server.write_all(b"answer").await.expect("answer");
        drop(server);
        assert_eq!(writing.await.expect("client"), b"answer");
    }
}
