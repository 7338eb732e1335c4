//! Reading whole packets off a socket during the straight-line startup phase.

use bytes::{Buf, Bytes, BytesMut};
use switchyard_pgwire::frame::MessageLimits;
use switchyard_pgwire::startup::{self, StartupPacket};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::SessionError;

pub(crate) use switchyard_store::wire::reserve_for_read;
use switchyard_store::wire::{self, ReadError};

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

/// Reads one whole tagged message from the client and returns its tag and body.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    limits: MessageLimits,
) -> Result<(u8, Bytes), SessionError> {
    wire::read_frame(rd, buf, limits).await.map_err(|e| match e {
        ReadError::Io(e) => SessionError::ClientIo(e),
        ReadError::Protocol(e) => SessionError::ClientProtocol(e),
    })
}
