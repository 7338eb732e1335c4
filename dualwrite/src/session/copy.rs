//! COPY FROM STDIN: the client's data relayed until CopyDone or CopyFail.

use super::*;
use switchyard_pgwire::frame::LARGE_FRAME;

impl<R, W, H> MirrorSession<'_, R, W, H>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    /// Relays COPY FROM STDIN data from the client until CopyDone or CopyFail.
    pub(super) async fn copy_in(&mut self) -> Result<(), SessionError> {
        // The client must see CopyInResponse now, even inside a transaction of the proxy's.
        self.flush_client_now().await?;
        loop {
            while let Some((tag, frame)) = take_frame(&mut self.client_buf, self.params.limits)
                .map_err(SessionError::ClientProtocol)?
                .map(|f| (f.tag, f.bytes))
            {
                self.large_seen |= frame.len() >= LARGE_FRAME;
                match tag {
                    b'd' | b'c' | b'f' | b'H' | b'S' => {
                        self.send_frame(&frame, None);
                        if tag == b'c' || tag == b'f' {
                            self.flush_upstream().await?;
                            return Ok(());
                        }
                    }
                    _ => {
                        return Err(SessionError::ClientProtocol(
                            switchyard_pgwire::ProtocolError::Malformed {
                                what: "COPY",
                                detail: "unexpected message during COPY FROM STDIN",
                            },
                        ))
                    }
                }
            }
            self.flush_upstream().await?;
            reserve(&mut self.client_buf, 64 * 1024);
            if self
                .client_rd
                .read_buf(&mut self.client_buf)
                .await
                .map_err(SessionError::ClientIo)?
                == 0
            {
                return Err(SessionError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}
