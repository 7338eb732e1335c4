//! Reading whole packets off a socket during the straight-line startup phase.

use bytes::{Buf, Bytes, BytesMut};
use switchyard_pgwire::frame::{peek_header, MessageLimits};
use switchyard_pgwire::startup::{self, StartupPacket};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::SessionError;

/// Makes sure `buf` has room for at least `want` more bytes without many small reads.
pub(crate) fn reserve_for_read(buf: &mut BytesMut, want: usize) {
    if buf.capacity() - buf.len() < want {
        buf.reserve(want.max(8 * 1024));
    }
}

/// Reads until one startup packet is buffered, and returns it.
pub(crate) async fn read_startup<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<StartupPacket, SessionError> {
    loop {
        if let Some((packet, used)) = startup::decode(buf)? {
            buf.advance(used);
            return Ok(packet);
        }
        reserve_for_read(buf, 1024);
        if rd.read_buf(buf).await.map_err(SessionError::ClientIo)? == 0 {
            return Err(SessionError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Which peer a frame is read from, to blame the right side for failures.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Peer {
    Client,
    Upstream,
}

/// Reads one whole tagged message and returns its tag and body.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    limits: MessageLimits,
    peer: Peer,
) -> Result<(u8, Bytes), SessionError> {
    loop {
        let header = peek_header(buf, limits).map_err(|e| match peer {
            Peer::Client => SessionError::ClientProtocol(e),
            Peer::Upstream => SessionError::UpstreamProtocol(e),
        })?;
        if let Some(h) = header {
            if buf.len() >= h.frame_len {
                let frame = buf.split_to(h.frame_len).freeze();
                return Ok((h.tag, frame.slice(h.body_range())));
            }
            reserve_for_read(buf, h.frame_len - buf.len());
        } else {
            reserve_for_read(buf, 1024);
        }
        let n = rd.read_buf(buf).await.map_err(|e| match peer {
            Peer::Client => SessionError::ClientIo(e),
            Peer::Upstream => SessionError::UpstreamIo(e),
        })?;
        if n == 0 {
            let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
            return Err(match peer {
                Peer::Client => SessionError::ClientIo(eof),
                Peer::Upstream => SessionError::UpstreamIo(eof),
            });
        }
    }
}
