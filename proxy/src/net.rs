//! A client connection in plain text or in TLS, and its two halves, one type each whatever the
//! transport: the relays read and write through them. Plain TCP halves are tokio's owned halves
//! (no lock between them); TLS halves share the TLS state through `tokio::io::split`. The store
//! connection's halves are of the same types: plain, or TLS as a client (`sslmode`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use switchyard_store::wire::StoreStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream as StoreTlsStream;
use tokio_rustls::server::TlsStream;

/// A client connection.
pub(crate) enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the TCP stream is handed to the TLS handshake: every operation fails.
    Detached,
}

/// The read half of a connection (a client's, or the store's).
pub(crate) enum NetRead {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<Box<TlsStream<TcpStream>>>),
    /// A store connection in TLS, the proxy being the TLS client.
    StoreTls(ReadHalf<Box<StoreTlsStream<TcpStream>>>),
}

/// The write half of a connection.
pub(crate) enum NetWrite {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<Box<TlsStream<TcpStream>>>),
    StoreTls(WriteHalf<Box<StoreTlsStream<TcpStream>>>),
}

impl ClientStream {
    /// Whether the connection is encrypted.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    pub(crate) fn into_split(self) -> io::Result<(NetRead, NetWrite)> {
        let halves = match self {
            ClientStream::Plain(s) => {
                let (r, w) = s.into_split();
                (NetRead::Plain(r), NetWrite::Plain(w))
            }
            ClientStream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (NetRead::Tls(r), NetWrite::Tls(w))
            }
            ClientStream::Detached => return Err(detached()),
        };
        Ok(halves)
    }
}

/// A store connection's halves: tokio's owned halves in plain text, as a client's.
pub(crate) fn split_store(stream: StoreStream) -> (NetRead, NetWrite) {
    match stream {
        StoreStream::Plain(s) => {
            let (r, w) = s.into_split();
            (NetRead::Plain(r), NetWrite::Plain(w))
        }
        StoreStream::Tls(s) => {
            let (r, w) = tokio::io::split(s);
            (NetRead::StoreTls(r), NetWrite::StoreTls(w))
        }
    }
}

fn detached() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection is in its TLS handshake",
    )
}

impl NetWrite {
    /// Writes what fits without waiting; plain TCP only (a TLS write goes through the TLS
    /// state): `Ok(0)` otherwise. Lets a relay skip the future machinery when the socket has
    /// room, which it nearly always has.
    pub(crate) fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            NetWrite::Plain(w) => match w.try_write(bytes) {
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => Ok(0),
                other => other,
            },
            NetWrite::Tls(_) | NetWrite::StoreTls(_) => Ok(0),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncRead for NetRead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetRead::Plain(s) => Pin::new(s).poll_read(cx, buf),
            NetRead::Tls(s) => Pin::new(s).poll_read(cx, buf),
            NetRead::StoreTls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for NetWrite {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NetWrite::Plain(s) => Pin::new(s).poll_write(cx, buf),
            NetWrite::Tls(s) => Pin::new(s).poll_write(cx, buf),
            NetWrite::StoreTls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetWrite::Plain(s) => Pin::new(s).poll_flush(cx),
            NetWrite::Tls(s) => Pin::new(s).poll_flush(cx),
            NetWrite::StoreTls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetWrite::Plain(s) => Pin::new(s).poll_shutdown(cx),
            NetWrite::Tls(s) => Pin::new(s).poll_shutdown(cx),
            NetWrite::StoreTls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
