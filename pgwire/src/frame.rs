//! Framing: find whole messages in a buffer before looking inside them.
//!
//! After startup every message is a tag byte, a big-endian `i32` length that counts itself but
//! not the tag, and a body. The proxy checks that a whole frame is buffered and that its length
//! is sane, then forwards or parses it; bodies it does not rewrite are never copied.

use bytes::{Bytes, BytesMut};

use crate::ProtocolError;

/// Caps applied while framing, so a peer cannot make us buffer without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    /// Largest accepted message, tag and length included.
    pub max_message_bytes: usize,
}

impl Default for MessageLimits {
    fn default() -> Self {
        MessageLimits {
            max_message_bytes: 256 * 1024 * 1024,
        }
    }
}

impl MessageLimits {
    /// Largest message accepted from a PostgreSQL server: its own 1 GB cap on a value plus
    /// headroom for the message around it. One setting for every reader of server messages.
    pub const SERVER: MessageLimits = MessageLimits {
        max_message_bytes: (1 << 30) + 1024,
    };
}

/// One whole message taken off a buffer ([`take_frame`]): the frame as it came, tag and length
/// included, so it can be forwarded without a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message type byte.
    pub tag: u8,
    /// Tag, length and body.
    pub bytes: Bytes,
}

impl Frame {
    /// The body (the frame without its tag and length), sharing the frame's memory.
    pub fn body(&self) -> Bytes {
        self.bytes.slice(FrameHeader::SIZE..)
    }
}

/// Takes the first whole frame off the front of `buf`. When only part of it is buffered,
/// returns `Ok(None)` after reserving room for more of it ([`reserve_ahead`]), so the next read
/// can continue it.
pub fn take_frame(buf: &mut BytesMut, limits: MessageLimits) -> Result<Option<Frame>, ProtocolError> {
    match peek_header(buf, limits)? {
        Some(h) if buf.len() >= h.frame_len => Ok(Some(Frame {
            tag: h.tag,
            bytes: buf.split_to(h.frame_len).freeze(),
        })),
        Some(h) => {
            reserve_ahead(buf, h.frame_len - buf.len());
            Ok(None)
        }
        None => Ok(None),
    }
}

/// The most buffer space reserved ahead of bytes that have not arrived.
pub const RESERVE_AHEAD_MAX: usize = 1 << 20;

/// Makes room in `buf` for the next `want` bytes of a partial frame, but never more than
/// [`RESERVE_AHEAD_MAX`] (and at least 8 KiB, so small reads are few). A length field is only
/// the peer's claim: reserving all of it at once would let five bytes (a header announcing a
/// message of the size limit) make the proxy allocate hundreds of MiB per connection, before
/// authentication even. Memory then grows with the bytes that really arrive (`BytesMut` grows
/// its capacity geometrically, so a large message costs few copies).
pub fn reserve_ahead(buf: &mut BytesMut, want: usize) {
    let want = want.clamp(8192, RESERVE_AHEAD_MAX);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
}

/// Frames from this size on make a buffer worth giving back once they are gone ([`release`]).
pub const LARGE_FRAME: usize = 1 << 20;

/// Gives back the memory of a buffer that grew for a large message: its bytes (few, once the
/// message is gone) move to a new buffer of their size, at least 8 KiB, and the large
/// allocation is freed once no frame taken from it is alive. A buffer's `capacity()` cannot
/// tell (after `advance` or `split_to` it counts only what is left past the frame), so the
/// caller calls this when it has seen a frame of [`LARGE_FRAME`] or more.
#[cold]
pub fn release(buf: &mut BytesMut) {
    let mut small = BytesMut::with_capacity(buf.len().max(8192));
    small.extend_from_slice(buf);
    *buf = small;
}

/// The tag and size of one complete or partial frame at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The message type byte.
    pub tag: u8,
    /// Total frame size: tag (1) + length field (4) + body.
    pub frame_len: usize,
}

impl FrameHeader {
    /// Size of the tag and length field.
    pub const SIZE: usize = 5;

    /// The body's range within a buffer that starts with this frame.
    pub fn body_range(&self) -> std::ops::Range<usize> {
        Self::SIZE..self.frame_len
    }
}

/// Reads the header of the frame at the start of `buf`.
///
/// Returns `Ok(None)` when fewer than five bytes are buffered. The caller still has to check
/// that `frame_len` bytes are present before touching the body; knowing the length early lets it
/// reserve buffer space once.
pub fn peek_header(buf: &[u8], limits: MessageLimits) -> Result<Option<FrameHeader>, ProtocolError> {
    let Some(head) = buf.get(..FrameHeader::SIZE) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len < 4 {
        return Err(ProtocolError::InvalidLength { len: len.into() });
    }
    // `len` is positive and at most i32::MAX, so the sum cannot overflow usize.
    let frame_len = len as usize + 1;
    if frame_len > limits.max_message_bytes {
        return Err(ProtocolError::TooLarge {
            len: frame_len,
            limit: limits.max_message_bytes,
        });
    }
    Ok(Some(FrameHeader {
        tag: head[0],
        frame_len,
    }))
}

/// Iterates over the complete frames at the start of a buffer.
///
/// Stops at the first partial frame; [`Frames::consumed`] then tells how many bytes the complete
/// frames cover, which is what a forwarder writes out in one go.
pub struct Frames<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: MessageLimits,
    failed: bool,
}

impl<'a> Frames<'a> {
    /// Starts iterating at the beginning of `buf`.
    pub fn new(buf: &'a [u8], limits: MessageLimits) -> Self {
        Frames {
            buf,
            pos: 0,
            limits,
            failed: false,
        }
    }

    /// Bytes covered by the frames returned so far.
    pub fn consumed(&self) -> usize {
        self.pos
    }

    /// Header of the partial frame that stopped the iteration, if its header is buffered.
    pub fn pending(&self) -> Result<Option<FrameHeader>, ProtocolError> {
        peek_header(&self.buf[self.pos..], self.limits)
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<(FrameHeader, &'a [u8]), ProtocolError>;

    /// Ends after the first error: nothing after a broken frame can be framed.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let rest = &self.buf[self.pos..];
        match peek_header(rest, self.limits) {
            Ok(Some(h)) if rest.len() >= h.frame_len => {
                self.pos += h.frame_len;
                Some(Ok((h, &rest[h.body_range()])))
            }
            Ok(_) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MessageLimits = MessageLimits {
        max_message_bytes: 64,
    };

    /// Five bytes announcing a message of the largest size allowed must not make the reader
    /// allocate that size: only what arrives, plus a bounded margin.
    #[test]
    fn a_partial_frame_reserves_a_bounded_margin_not_its_announced_length() {
        let limits = MessageLimits::SERVER;
        let announced = (limits.max_message_bytes - 1) as u32;
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"D");
        buf.extend_from_slice(&announced.to_be_bytes());
        assert!(take_frame(&mut buf, limits).unwrap().is_none());
        assert!(
            buf.capacity() <= 4 * RESERVE_AHEAD_MAX,
            "reserved {} bytes for a frame announcing {announced}",
            buf.capacity()
        );
        // As the body arrives, room keeps being made for more.
        buf.extend_from_slice(&vec![0u8; RESERVE_AHEAD_MAX]);
        assert!(take_frame(&mut buf, limits).unwrap().is_none());
        assert!(buf.capacity() - buf.len() >= 8192);
    }

    #[test]
    fn splits_complete_frames_and_stops_at_a_partial_one() {
        let mut buf = vec![b'Q', 0, 0, 0, 8, b's', b'e', b'l', b'\0'];
        buf.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        buf.extend_from_slice(&[b'Q', 0, 0, 0, 9, b'x']);
        let mut frames = Frames::new(&buf, LIMITS);
        let (h, body) = frames.next().unwrap().unwrap();
        assert_eq!((h.tag, h.frame_len, body), (b'Q', 9, &b"sel\0"[..]));
        let (h, body) = frames.next().unwrap().unwrap();
        assert_eq!((h.tag, h.frame_len, body.len()), (b'S', 5, 0));
        assert!(frames.next().is_none());
        assert_eq!(frames.consumed(), 14);
        assert_eq!(frames.pending().unwrap().unwrap().frame_len, 10);
    }

    #[test]
    fn rejects_lengths_below_four_and_above_the_cap() {
        assert_eq!(
            peek_header(&[b'Q', 0, 0, 0, 3], LIMITS),
            Err(ProtocolError::InvalidLength { len: 3 })
        );
        assert_eq!(
            peek_header(&[b'Q', 0xff, 0xff, 0xff, 0xff], LIMITS),
            Err(ProtocolError::InvalidLength { len: -1 })
        );
        assert!(matches!(
            peek_header(&[b'Q', 0, 0, 1, 0], LIMITS),
            Err(ProtocolError::TooLarge { len: 257, limit: 64 })
        ));
        assert_eq!(peek_header(&[b'Q', 0, 0], LIMITS), Ok(None));
    }

    #[test]
    fn take_frame_takes_whole_frames_and_reserves_for_a_partial_one() {
        let mut buf = BytesMut::from(&[b'C', 0, 0, 0, 8, b'S', b'E', b'T', 0, b'Z', 0, 0, 0, 5][..]);
        let f = take_frame(&mut buf, LIMITS).unwrap().unwrap();
        assert_eq!((f.tag, &f.body()[..]), (b'C', &b"SET\0"[..]));
        assert_eq!(&f.bytes[..5], &[b'C', 0, 0, 0, 8]);
        // Half a ReadyForQuery: nothing taken, room for the rest.
        assert_eq!(take_frame(&mut buf, LIMITS).unwrap(), None);
        assert_eq!(buf.len(), 5);
        assert!(buf.capacity() >= 6);
        buf.extend_from_slice(b"I");
        let f = take_frame(&mut buf, LIMITS).unwrap().unwrap();
        assert_eq!((f.tag, &f.body()[..]), (b'Z', &b"I"[..]));
        assert!(buf.is_empty());
        assert_eq!(take_frame(&mut buf, LIMITS).unwrap(), None);
        let mut bad = BytesMut::from(&[b'Z', 0, 0, 0, 2][..]);
        assert!(take_frame(&mut bad, LIMITS).is_err());
    }

    #[test]
    fn stops_after_the_first_error() {
        let buf = [b'S', 0, 0, 0, 4, b'Q', 0, 0, 0, 1, b'S', 0, 0, 0, 4];
        let results: Vec<_> = Frames::new(&buf, LIMITS).collect();
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok() && results[1].is_err());
    }
}
