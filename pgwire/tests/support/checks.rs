//! Invariant checks run on untrusted input, shared by `tests/robustness.rs` (stable, plain
//! `cargo test`) and the cargo-fuzz targets in `fuzz/fuzz_targets/` (which include this file with
//! `#[path]`). Every function here takes arbitrary bytes: it may only fail by panicking, which is
//! what the callers look for. A panic means either the decoder panicked or one of the asserted
//! invariants does not hold.

#![allow(dead_code, clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use bytes::BytesMut;
use switchyard_pgwire::auth::{
    verify_md5_response, Md5Source, ScramError, ScramKeyClient, ScramKeys, ScramSecret, ScramServer,
};
use switchyard_pgwire::backend::{self, Authentication, ErrorFields, ServerMessage};
use switchyard_pgwire::frame::{
    peek_header, take_frame, FrameHeader, Frames, MessageLimits, RESERVE_AHEAD_MAX,
};
use switchyard_pgwire::frontend::{self, ClientMessage, Target};
use switchyard_pgwire::startup::{self, StartupPacket, MAX_STARTUP_PACKET_LEN};
use switchyard_pgwire::ProtocolError;

/// A cap small enough that random input reaches `TooLarge` as well as complete frames.
pub const SMALL_LIMITS: MessageLimits = MessageLimits {
    max_message_bytes: 512,
};

/// Fixed server nonce for the SCRAM exchange (printable ASCII without ',').
pub const SCRAM_SERVER_NONCE: &str = "fuzzServerNonce0123456789";

/// Fixed client nonce of the key-reuse client ([`check_scram_client`]).
pub const SCRAM_CLIENT_NONCE: &str = "fuzzClientNonce";

/// Salt of [`scram_secret`].
pub const SCRAM_SALT: &[u8] = b"switchyard-fuzz-salt";

/// Iterations of [`scram_secret`]: low, so that clients in tests derive keys quickly.
pub const SCRAM_ITERATIONS: u32 = 16;

/// Password of [`scram_secret`].
pub const SCRAM_PASSWORD: &str = "pencil";

/// MD5 fixture: `md5_secret("secret", "postgres")`, and the right answer for salt 1,2,3,4
/// (both computed with Python's hashlib; same values as the crate's unit tests).
pub const MD5_USER: &str = "postgres";
pub const MD5_SECRET: &str = "md553f48b7c4b76a86ce72276c5755f217d";
pub const MD5_SALT: [u8; 4] = [1, 2, 3, 4];
pub const MD5_RESPONSE: &[u8] = b"md5bb41a296aab6baccb36ff243a562abff";

/// The secret every SCRAM check runs against.
pub fn scram_secret() -> ScramSecret {
    ScramSecret::from_password(SCRAM_PASSWORD, SCRAM_SALT, SCRAM_ITERATIONS)
        .expect("fixed SCRAM fixture is valid")
}

/// Rebuilds the frame `tag | len | body` that a `(tag, body)` pair came from.
pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + FrameHeader::SIZE);
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Whether `inner` lies inside `outer` (borrowed parsers must not point elsewhere).
fn within(outer: &[u8], inner: &[u8]) -> bool {
    if inner.is_empty() {
        return true;
    }
    let (o, i) = (outer.as_ptr_range(), inner.as_ptr_range());
    o.start <= i.start && i.end <= o.end
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// `body` starts with each of `parts` followed by a NUL, in order; returns the rest.
fn cstrs<'a>(body: &'a [u8], parts: &[&[u8]]) -> &'a [u8] {
    let mut rest = body;
    for part in parts {
        assert!(within(body, part), "field not borrowed from the body");
        assert!(!part.contains(&0), "field contains a NUL");
        assert!(rest.len() > part.len(), "field runs past the body");
        assert_eq!(&rest[..part.len()], *part);
        assert_eq!(rest[part.len()], 0);
        rest = &rest[part.len() + 1..];
    }
    rest
}

fn touch_error(e: &ProtocolError) {
    let _ = e.sqlstate().as_str();
    assert!(!e.to_string().is_empty());
}

/// `startup::decode` on arbitrary bytes.
pub fn check_startup(data: &[u8]) {
    let decoded = startup::decode(data);
    let declared = data.get(..4).map(be_i32);
    match decoded {
        Ok(Some((packet, used))) => {
            assert_eq!(declared, Some(used as i32), "used differs from the length field");
            assert!((8..=MAX_STARTUP_PACKET_LEN).contains(&used));
            assert!(used <= data.len());
            // Only the packet's own bytes matter, and a strict prefix is incomplete.
            assert_eq!(startup::decode(&data[..used]), Ok(Some((packet.clone(), used))));
            assert_eq!(startup::decode(&data[..used - 1]), Ok(None));
            // Encoders give back exactly the bytes that were decoded.
            let mut out = BytesMut::new();
            match &packet {
                StartupPacket::Startup(m) => {
                    for (k, v) in &m.params {
                        assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
                        assert!(m.param(k).is_some());
                    }
                    m.encode(&mut out);
                    assert_eq!(&out[..], &data[..used], "StartupMessage does not round-trip");
                }
                StartupPacket::Cancel(key) => {
                    assert!((4..=256).contains(&key.secret.len()));
                    key.encode_request(&mut out);
                    assert_eq!(&out[..], &data[..used], "CancelRequest does not round-trip");
                }
                StartupPacket::SslRequest | StartupPacket::GssEncRequest => assert_eq!(used, 8),
            }
        }
        Ok(None) => match declared {
            None => assert!(data.len() < 4),
            Some(len) => {
                assert!((8..=MAX_STARTUP_PACKET_LEN as i32).contains(&len));
                assert!(data.len() < len as usize, "complete packet reported as partial");
            }
        },
        Err(e) => {
            touch_error(&e);
            // Errors come from the packet's bytes alone: more input does not change them.
            if let Some(len) = declared.filter(|l| (8..=MAX_STARTUP_PACKET_LEN as i32).contains(l)) {
                assert!(data.len() >= len as usize, "error before the packet is complete");
            }
        }
    }
}

type FrameItem<'a> = Result<(FrameHeader, &'a [u8]), ProtocolError>;

/// Frames `data` and checks the framing invariants, then hands every complete frame to
/// `on_frame`. Returns how many complete frames were found.
pub fn check_stream(data: &[u8], limits: MessageLimits, mut on_frame: impl FnMut(u8, &[u8])) -> usize {
    let items = frame_items(data, limits);
    let mut pos = 0;
    let mut count = 0;
    for item in &items {
        match item {
            Ok((h, body)) => {
                assert!(h.frame_len >= FrameHeader::SIZE, "frame_len {} < 5", h.frame_len);
                assert!(h.frame_len <= limits.max_message_bytes);
                assert!(pos + h.frame_len <= data.len());
                assert_eq!(h.tag, data[pos]);
                assert_eq!(be_i32(&data[pos + 1..]) as usize + 1, h.frame_len);
                assert_eq!(h.body_range(), FrameHeader::SIZE..h.frame_len);
                assert_eq!(*body, &data[pos + FrameHeader::SIZE..pos + h.frame_len]);
                assert_eq!(peek_header(&data[pos..], limits), Ok(Some(*h)));
                pos += h.frame_len;
                count += 1;
                on_frame(h.tag, body);
            }
            Err(e) => {
                touch_error(e);
                assert!(matches!(
                    e,
                    ProtocolError::InvalidLength { .. } | ProtocolError::TooLarge { .. }
                ));
                assert_eq!(peek_header(&data[pos..], limits), Err(e.clone()));
            }
        }
    }
    // Same walk again, checking consumed() and pending() along the way.
    let mut frames = Frames::new(data, limits);
    assert_eq!(frames.consumed(), 0);
    let mut walked = 0;
    loop {
        match frames.next() {
            Some(Ok((h, _))) => walked += h.frame_len,
            Some(Err(e)) => {
                assert_eq!(frames.pending(), Err(e));
                break;
            }
            None => {
                match frames.pending() {
                    Ok(None) => assert!(data.len() - walked < FrameHeader::SIZE),
                    Ok(Some(h)) => {
                        assert!(h.frame_len >= FrameHeader::SIZE);
                        assert!(data.len() - walked < h.frame_len, "complete frame left pending");
                    }
                    Err(e) => panic!("iteration ended cleanly but pending() fails: {e}"),
                }
                break;
            }
        }
        assert_eq!(frames.consumed(), walked);
    }
    assert_eq!(frames.consumed(), walked);
    assert_eq!(walked, pos);
    assert!(frames.consumed() <= data.len());

    // Reading the stream in two chunks sees the same frames as reading it at once.
    let half = frame_items(&data[..data.len() / 2], limits);
    assert!(half.len() <= items.len());
    assert_eq!(
        &half[..],
        &items[..half.len()],
        "framing a prefix disagrees with the whole"
    );
    count
}

/// All items `Frames` yields, stopping after the first error (the iterator repeats it).
fn frame_items(data: &[u8], limits: MessageLimits) -> Vec<FrameItem<'_>> {
    let mut items = Vec::new();
    for item in Frames::new(data, limits) {
        let stop = item.is_err();
        items.push(item);
        if stop {
            break;
        }
    }
    items
}

/// The limits [`check_take_frame_input`] picks from: a small cap that random input exceeds, the
/// one cap for server messages, and a client's default.
pub fn take_frame_limits() -> [MessageLimits; 3] {
    [SMALL_LIMITS, MessageLimits::SERVER, MessageLimits::default()]
}

/// A `take_frame` fuzz input: the first byte picks the limits ([`take_frame_limits`]) and the
/// size of the pieces the stream arrives in (1 to 85 bytes); the rest is the stream.
pub fn check_take_frame_input(data: &[u8]) {
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let choices = take_frame_limits();
    let limits = choices[usize::from(pick) % choices.len()];
    check_take_frame(stream, limits, usize::from(pick) / choices.len() + 1);
}

/// Feeds `stream` to `take_frame` `piece` bytes at a time, as reads would, taking every frame
/// after each piece. It must take exactly the frames `Frames` finds in the whole stream, in
/// order and as their bytes came, fail where `Frames` fails, leave the buffer as it was when it
/// takes nothing, and have room reserved for the rest of a frame it waits for.
pub fn check_take_frame(stream: &[u8], limits: MessageLimits, piece: usize) {
    let mut expected = frame_items(stream, limits).into_iter();
    let mut buf = BytesMut::new();
    let (mut fed, mut taken) = (0, 0);
    'feed: for chunk in stream.chunks(piece.max(1)) {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            let before = buf.clone();
            match take_frame(&mut buf, limits) {
                Ok(Some(frame)) => {
                    let Some(Ok((h, body))) = expected.next() else {
                        panic!("take_frame took a frame that Frames does not see");
                    };
                    assert_eq!(frame.tag, h.tag);
                    assert_eq!(&frame.bytes[..], &stream[taken..taken + h.frame_len]);
                    assert_eq!(&frame.body()[..], body);
                    taken += h.frame_len;
                    assert_eq!(&buf[..], &stream[taken..fed], "take_frame kept the wrong bytes");
                }
                Ok(None) => {
                    assert_eq!(buf, before, "take_frame changed the buffer but took nothing");
                    if let Ok(Some(h)) = peek_header(&buf, limits) {
                        assert!(buf.len() < h.frame_len, "a whole frame was left in the buffer");
                        // Room for more of it, but never the announced length up front.
                        let missing = h.frame_len - buf.len();
                        let room = buf.capacity() - buf.len();
                        assert!(
                            room >= missing.min(RESERVE_AHEAD_MAX),
                            "no room reserved for the frame"
                        );
                        assert!(
                            buf.capacity() <= 2 * buf.len() + 4 * RESERVE_AHEAD_MAX,
                            "reserved {} bytes for a frame of {} with {} buffered",
                            buf.capacity(),
                            h.frame_len,
                            buf.len()
                        );
                    }
                    break;
                }
                Err(e) => {
                    touch_error(&e);
                    assert_eq!(
                        expected.next(),
                        Some(Err(e)),
                        "take_frame and Frames fail differently"
                    );
                    assert_eq!(buf, before, "take_frame changed the buffer and failed");
                    break 'feed;
                }
            }
        }
    }
    if let Some(item) = expected.next() {
        // Everything Frames found lies within the bytes fed, so take_frame had it in its buffer.
        panic!("take_frame stopped before {item:?}");
    }
}

/// `backend::error_fields` on any body, well formed or not. Every field it returns is a
/// `type value NUL` run of the body starting at the body's start or after a NUL; the fields of
/// a prefix are those of the whole; on a body `backend::parse` accepts, it agrees with it.
pub fn check_error_body(body: &[u8]) {
    let fields = backend::error_fields(body);
    check_error_fields(body, &fields);
    for kind in 1..=255u8 {
        let Some(value) = fields.get(kind) else {
            continue;
        };
        let at = value.as_ptr() as usize - body.as_ptr() as usize;
        assert!(
            at >= 1 && body[at - 1] == kind,
            "field {kind} not after its type byte"
        );
        assert!(
            at == 1 || body[at - 2] == 0,
            "field {kind} does not start a field"
        );
        assert_eq!(
            body.get(at + value.len()),
            Some(&0),
            "field {kind} without its NUL"
        );
    }
    let prefix = backend::error_fields(&body[..body.len() / 2]);
    for kind in 1..=255u8 {
        if let Some(value) = prefix.get(kind) {
            assert_eq!(
                fields.get(kind),
                Some(value),
                "a prefix has field {kind} differently"
            );
        }
    }
    if let Ok(ServerMessage::ErrorResponse(strict)) = backend::parse(b'E', body) {
        assert_eq!(
            strict, fields,
            "error_fields and parse disagree on a well-formed body"
        );
    }
}

/// `backend::command_tag` on any body: the bytes before the first NUL, all of them without one.
pub fn check_command_tag(body: &[u8]) {
    let tag = backend::command_tag(body);
    assert_eq!(tag.as_ptr(), body.as_ptr(), "the tag does not start the body");
    assert!(!tag.contains(&0));
    assert!(
        tag.len() == body.len() || body[tag.len()] == 0,
        "the tag stops before its NUL"
    );
}

/// `frontend::parse` on one frame, plus the auth-phase body parsers.
pub fn check_frontend_message(tag: u8, body: &[u8]) {
    match frontend::parse(tag, body) {
        Err(ProtocolError::UnknownTag(t)) => {
            assert_eq!(t, tag);
            assert!(!frontend::is_known_tag(tag), "known tag {tag} reported unknown");
        }
        Err(e) => {
            touch_error(&e);
            assert!(frontend::is_known_tag(tag));
        }
        Ok(msg) => {
            assert!(frontend::is_known_tag(tag), "unknown tag {tag} parsed");
            check_client_message(tag, body, &msg);
        }
    }
    check_sasl_initial_response(body);
    check_password(body);
}

fn check_client_message(tag: u8, body: &[u8], msg: &ClientMessage<'_>) {
    match *msg {
        ClientMessage::Query { sql } => {
            assert_eq!(tag, b'Q');
            assert!(cstrs(body, &[sql]).is_empty());
            if let Ok(text) = std::str::from_utf8(sql) {
                let mut out = BytesMut::new();
                frontend::query(&mut out, text);
                assert_eq!(&out[..], &frame(tag, body)[..]);
            }
        }
        ClientMessage::Parse { statement, sql } => {
            assert_eq!(tag, b'P');
            let rest = cstrs(body, &[statement, sql]);
            assert!(rest.len() >= 2);
            let n = i16::from_be_bytes([rest[0], rest[1]]);
            assert!(n >= 0);
            assert_eq!(rest.len(), 2 + 4 * n as usize);
        }
        ClientMessage::Bind { portal, statement } => {
            assert_eq!(tag, b'B');
            cstrs(body, &[portal, statement]);
        }
        ClientMessage::Describe { target, name } | ClientMessage::Close { target, name } => {
            assert!(tag == b'D' || tag == b'C');
            assert_eq!(matches!(msg, ClientMessage::Describe { .. }), tag == b'D');
            let expected = match target {
                Target::Statement => b'S',
                Target::Portal => b'P',
            };
            assert_eq!(body.first(), Some(&expected));
            assert!(cstrs(&body[1..], &[name]).is_empty());
        }
        ClientMessage::Execute { portal, max_rows } => {
            assert_eq!(tag, b'E');
            let rest = cstrs(body, &[portal]);
            assert_eq!(rest, max_rows.to_be_bytes());
        }
        ClientMessage::Sync | ClientMessage::Flush | ClientMessage::Terminate | ClientMessage::CopyDone => {
            assert!(body.is_empty());
            let expected = match msg {
                ClientMessage::Sync => b'S',
                ClientMessage::Flush => b'H',
                ClientMessage::Terminate => b'X',
                _ => b'c',
            };
            assert_eq!(tag, expected);
            if tag == b'X' {
                let mut out = BytesMut::new();
                frontend::terminate(&mut out);
                assert_eq!(&out[..], &frame(tag, body)[..]);
            }
        }
        ClientMessage::CopyData(data) => {
            assert_eq!(tag, b'd');
            assert_eq!(data, body);
        }
        ClientMessage::CopyFail { message } => {
            assert_eq!(tag, b'f');
            cstrs(body, &[message]);
        }
        ClientMessage::FunctionCall(data) => {
            assert_eq!(tag, b'F');
            assert_eq!(data, body);
        }
        ClientMessage::Password(data) => {
            assert_eq!(tag, b'p');
            assert_eq!(data, body);
            let mut out = BytesMut::new();
            frontend::sasl_response(&mut out, data);
            assert_eq!(&out[..], &frame(tag, body)[..]);
        }
    }
}

/// `parse_sasl_initial_response` on any body.
pub fn check_sasl_initial_response(body: &[u8]) {
    match frontend::parse_sasl_initial_response(body) {
        Ok((mechanism, data)) => {
            let rest = cstrs(body, &[mechanism.as_bytes()]);
            assert!(rest.len() >= 4);
            let declared = be_i32(rest);
            assert!(within(body, data));
            if declared < 0 {
                assert!(data.is_empty());
                assert_eq!(rest.len(), 4);
            } else {
                assert_eq!(declared as usize, data.len());
                assert_eq!(&rest[4..], data);
                let mut out = BytesMut::new();
                frontend::sasl_initial_response(&mut out, mechanism, data);
                assert_eq!(&out[..], &frame(b'p', body)[..]);
            }
        }
        Err(e) => touch_error(&e),
    }
}

/// `parse_password` on any body, and the MD5 check on what it yields.
pub fn check_password(body: &[u8]) {
    match frontend::parse_password(body) {
        Ok(password) => {
            assert!(cstrs(body, &[password]).is_empty());
            let mut out = BytesMut::new();
            frontend::password(&mut out, password);
            assert_eq!(&out[..], &frame(b'p', body)[..]);
            check_md5(password);
        }
        Err(e) => touch_error(&e),
    }
}

/// `verify_md5_response` accepts exactly the right answer, whatever the bytes.
pub fn check_md5(response: &[u8]) {
    let right = response == MD5_RESPONSE;
    let secret = Md5Source::Secret(MD5_SECRET.to_owned());
    assert_eq!(verify_md5_response(&secret, MD5_USER, MD5_SALT, response), right);
    // The password form hashes twice more before comparing; only worth it for answers of the
    // right length, the others fail the same comparison.
    if response.len() == MD5_RESPONSE.len() {
        let password = Md5Source::Password("secret".to_owned());
        assert_eq!(
            verify_md5_response(&password, MD5_USER, MD5_SALT, response),
            right
        );
    }
    // A stored "secret" built from the input is never trusted unless it is well formed.
    if let Ok(text) = std::str::from_utf8(response) {
        let _ = verify_md5_response(
            &Md5Source::Secret(text.to_owned()),
            MD5_USER,
            MD5_SALT,
            MD5_RESPONSE,
        );
    }
}

const BACKEND_TAGS: &[u8] = b"RKSZEN";

/// `backend::parse` on one frame.
pub fn check_backend_message(tag: u8, body: &[u8]) {
    match backend::parse(tag, body) {
        Err(e) => {
            touch_error(&e);
            assert!(BACKEND_TAGS.contains(&tag), "tag {tag} should be passed through");
            assert!(!matches!(e, ProtocolError::UnknownTag(_)));
        }
        Ok(msg) => check_server_message(tag, body, &msg),
    }
}

fn check_server_message(tag: u8, body: &[u8], msg: &ServerMessage<'_>) {
    let whole = frame(tag, body);
    let mut out = BytesMut::new();
    match msg {
        ServerMessage::Other(t) => {
            assert_eq!(*t, tag);
            assert!(!BACKEND_TAGS.contains(&tag));
        }
        ServerMessage::Authentication(auth) => {
            assert_eq!(tag, b'R');
            assert!(body.len() >= 4);
            let code = be_i32(body);
            let rest = &body[4..];
            match auth {
                Authentication::Ok => {
                    assert_eq!(code, 0);
                    backend::auth_ok(&mut out);
                }
                Authentication::CleartextPassword => assert_eq!(code, 3),
                Authentication::Md5Password { salt } => {
                    assert_eq!(code, 5);
                    assert_eq!(rest.get(..4), Some(&salt[..]));
                    backend::auth_md5(&mut out, *salt);
                }
                Authentication::Sasl { mechanisms } => {
                    assert_eq!(code, 10);
                    for m in mechanisms {
                        assert!(!m.is_empty() && within(body, m.as_bytes()));
                    }
                    backend::auth_sasl(&mut out, mechanisms);
                }
                Authentication::SaslContinue(data) => {
                    assert_eq!(code, 11);
                    assert_eq!(*data, rest);
                    assert!(within(body, data));
                    backend::auth_sasl_continue(&mut out, data);
                }
                Authentication::SaslFinal(data) => {
                    assert_eq!(code, 12);
                    assert_eq!(*data, rest);
                    assert!(within(body, data));
                    backend::auth_sasl_final(&mut out, data);
                }
                Authentication::Unsupported(c) => {
                    assert_eq!(*c, code);
                    assert!(![0, 3, 5, 10, 11, 12].contains(c));
                }
            }
            // The parser ignores trailing bytes, so the re-encoded body is a prefix of ours.
            if !out.is_empty() {
                assert_eq!(out[0], tag);
                let encoded_body = &out[FrameHeader::SIZE..];
                assert!(
                    body.starts_with(encoded_body),
                    "Authentication does not round-trip"
                );
            }
        }
        ServerMessage::BackendKeyData { pid, secret } => {
            assert_eq!(tag, b'K');
            assert_eq!(*pid, be_i32(body));
            assert_eq!(*secret, &body[4..]);
        }
        ServerMessage::ParameterStatus { name, value } => {
            assert_eq!(tag, b'S');
            backend::parameter_status(&mut out, name, value);
            assert_eq!(&out[..], &whole[..], "ParameterStatus does not round-trip");
        }
        ServerMessage::ReadyForQuery(status) => {
            assert_eq!(tag, b'Z');
            backend::ready_for_query(&mut out, *status);
            assert_eq!(&out[..], &whole[..], "ReadyForQuery does not round-trip");
        }
        ServerMessage::ErrorResponse(fields) | ServerMessage::NoticeResponse(fields) => {
            assert_eq!(matches!(msg, ServerMessage::ErrorResponse(_)), tag == b'E');
            assert!(tag == b'E' || tag == b'N');
            check_error_fields(body, fields);
        }
    }
}

fn check_error_fields(body: &[u8], fields: &ErrorFields<'_>) {
    // A field's type byte occurs in the body; only those can be present.
    let mut seen = [false; 256];
    for &b in body {
        seen[usize::from(b)] = true;
    }
    for kind in (1..=255u8).filter(|&k| seen[usize::from(k)]) {
        if let Some(v) = fields.get(kind) {
            assert!(within(body, v) && !v.contains(&0));
        }
    }
    if let Some(code) = fields.code() {
        assert_eq!(fields.get(b'C'), Some(&code.0[..]));
        let _ = code.as_str();
        let _ = format!("{code:?} {code}");
    }
    let _ = fields.message();
    let _ = fields.severity();
}

fn touch_scram_error(e: &ScramError) {
    assert!(
        e.is_client_error(),
        "client input caused a non-client error: {e:?}"
    );
    let _ = e.kind();
    let _ = e.sqlstate().as_str();
    assert!(!e.to_string().is_empty());
}

/// Runs a SCRAM exchange against [`scram_secret`] with the given client messages. Returns the
/// server-final message if the client's proof was accepted.
pub fn check_scram(secret: &ScramSecret, client_first: &[u8], client_final: &[u8]) -> Option<Vec<u8>> {
    let server = ScramServer::with_nonce(secret.clone(), SCRAM_SERVER_NONCE).expect("fixed nonce is valid");
    let awaiting = match server.client_first(client_first) {
        Ok(awaiting) => awaiting,
        Err(e) => {
            touch_scram_error(&e);
            return None;
        }
    };
    // server-first = "r=" client-nonce server-nonce ",s=" salt ",i=" iterations
    let server_first = std::str::from_utf8(awaiting.server_first_message()).expect("server-first is UTF-8");
    let stored = secret.to_string();
    let salt_b64 = stored.split(['$', ':']).nth(2).expect("stored form has a salt");
    let tail = format!("{SCRAM_SERVER_NONCE},s={salt_b64},i={}", secret.iterations);
    let client_nonce = server_first
        .strip_prefix("r=")
        .and_then(|s| s.strip_suffix(&tail))
        .unwrap_or_else(|| panic!("unexpected server-first {server_first:?}"));
    assert!(!client_nonce.is_empty());
    assert!(client_nonce
        .bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && b != b','));
    let needle = format!("r={client_nonce}");
    assert!(
        client_first.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "client nonce not taken from the client-first message"
    );
    match awaiting.client_final(client_final) {
        Ok(server_final) => {
            assert!(server_final.starts_with(b"v="));
            assert_eq!(
                server_final.len(),
                2 + 44,
                "server signature is not 32 bytes of base64"
            );
            Some(server_final)
        }
        Err(e) => {
            touch_scram_error(&e);
            None
        }
    }
}

/// Splits a fuzz input into client-first and client-final at its first NUL (a NUL is never
/// valid inside either message, so no reachable behaviour is lost), and runs the exchange.
pub fn check_scram_input(secret: &ScramSecret, data: &[u8]) -> Option<Vec<u8>> {
    let (first, last) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b""[..]),
    };
    check_scram(secret, first, last)
}

/// The client side of a SCRAM key-reuse login (`ScramKeyClient`, how the proxy logs in upstream
/// as a client it verified) fed a server's messages: `server-first NUL server-final`, split at
/// the first NUL. The keys are [`scram_secret`]'s with a made-up ClientKey and the nonce is
/// [`SCRAM_CLIENT_NONCE`]. No panic; errors blame the server; a client-final is well formed;
/// returns whether the server's signature was accepted (a fuzzer cannot forge one).
pub fn check_scram_client_input(secret: &ScramSecret, data: &[u8]) -> bool {
    let (first, last) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b""[..]),
    };
    check_scram_client(secret, first, last)
}

/// See [`check_scram_client_input`].
pub fn check_scram_client(secret: &ScramSecret, server_first: &[u8], server_final: &[u8]) -> bool {
    let touch = |e: &ScramError| {
        assert!(
            matches!(e, ScramError::Server(_)),
            "a server message caused a non-server error: {e:?}"
        );
        assert!(!e.to_string().is_empty());
    };
    let keys = ScramKeys {
        client_key: [7; 32],
        secret: secret.clone(),
    };
    let client = ScramKeyClient::with_nonce(keys, SCRAM_CLIENT_NONCE);
    let first = client.client_first_message();
    assert_eq!(first, format!("n,,n=,r={SCRAM_CLIENT_NONCE}").into_bytes());
    let (waiting, client_final) = match client.server_first(server_first) {
        Ok(next) => next,
        Err(e) => {
            touch(&e);
            return false;
        }
    };
    // client-final = "c=biws,r=" nonce ",p=" base64(32 bytes): the nonce is the server's,
    // which extends the client's.
    let text = std::str::from_utf8(&client_final).expect("client-final is UTF-8");
    let nonce = text
        .strip_prefix("c=biws,r=")
        .and_then(|t| t.rsplit_once(",p="))
        .map(|(nonce, proof)| {
            assert_eq!(proof.len(), 44, "proof is not 32 bytes of base64: {text}");
            nonce
        })
        .unwrap_or_else(|| panic!("malformed client-final {text:?}"));
    assert!(nonce.len() > SCRAM_CLIENT_NONCE.len() && nonce.starts_with(SCRAM_CLIENT_NONCE));
    match waiting.server_final(server_final) {
        Ok(()) => true,
        Err(e) => {
            touch(&e);
            false
        }
    }
}
