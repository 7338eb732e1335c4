//! Robustness of the decoders against hostile input, on stable and in plain `cargo test`.
//!
//! Seeded random inputs and mutations (bit flips, truncations, length-field corruption, random
//! edits) of valid messages built with the crate's own encoders go through the same checks as
//! the cargo-fuzz targets in `fuzz/` (`tests/support/checks.rs`): no decoder may panic, framing
//! invariants must hold, and whatever parses must re-encode to the same bytes. Everything is
//! deterministic (fixed seeds) and bounded.

// Test helpers outside #[test] functions fail by panicking, like the tests themselves.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

#[path = "support/checks.rs"]
mod checks;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rand::{Rng, RngCore};
use switchyard_pgwire::backend::{self, ErrorResponse, Severity, TransactionStatus};
use switchyard_pgwire::frame::MessageLimits;
use switchyard_pgwire::frontend;
use switchyard_pgwire::sqlstate;
use switchyard_pgwire::startup::{
    CancelKey, StartupMessage, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET_LEN,
    PROTOCOL_3_0, PROTOCOL_3_2, SSL_REQUEST_CODE,
};

/// SplitMix64: deterministic and, unlike ChaCha, cheap in an unoptimised test build.
struct TestRng(u64);

impl TestRng {
    fn new(seed: u64) -> Self {
        TestRng(seed)
    }
}

impl RngCore for TestRng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// Random inputs per generator in `seeded_random_inputs`.
const RANDOM_INPUTS: usize = 20_000;

/// Bytes that matter to the decoders: tags, NUL, small lengths, SCRAM syntax, bad UTF-8.
const INTERESTING: &[u8] = b"\0\x04\x05\x08\xff\x7f\x80QPBDECSHXdcfFpRKZNIT,=nyrcpv";

fn all_limits() -> [MessageLimits; 2] {
    [checks::SMALL_LIMITS, MessageLimits::default()]
}

/// Every decoder on one input. Cheap enough to run on everything.
fn check_all(data: &[u8]) {
    checks::check_startup(data);
    for limits in all_limits() {
        checks::check_stream(data, limits, checks::check_frontend_message);
        checks::check_stream(data, limits, checks::check_backend_message);
    }
    checks::check_take_frame_input(data);
    checks::check_error_body(data);
    checks::check_command_tag(data);
}

fn random_bytes(rng: &mut TestRng, max_len: usize) -> Vec<u8> {
    let len = rng.gen_range(0..=max_len);
    (0..len)
        .map(|_| {
            if rng.gen_bool(0.5) {
                rng.gen()
            } else {
                INTERESTING[rng.gen_range(0..INTERESTING.len())]
            }
        })
        .collect()
}

/// A body made of the field types messages use: C strings, i16, i32, raw bytes.
fn random_body(rng: &mut TestRng) -> Vec<u8> {
    let mut body = Vec::new();
    for _ in 0..rng.gen_range(0..5) {
        match rng.gen_range(0..5) {
            0 => {
                body.extend(random_bytes(rng, 12).into_iter().filter(|&b| b != 0));
                body.push(0);
            }
            1 => body.extend_from_slice(&rng.gen_range(-2i16..4).to_be_bytes()),
            2 => body.extend_from_slice(&[-1i32, 0, 3, 5, 10, 11, 12, 13][rng.gen_range(0..8)].to_be_bytes()),
            3 => body.push(INTERESTING[rng.gen_range(0..INTERESTING.len())]),
            _ => body.extend(random_bytes(rng, 8)),
        }
    }
    body
}

/// A stream of frames with sensible tags and mostly right lengths.
fn random_stream(rng: &mut TestRng) -> Vec<u8> {
    const TAGS: &[u8] = b"QPBDECSHXdcfFpRKZNT!\0";
    let mut out = Vec::new();
    for _ in 0..rng.gen_range(1..5) {
        let tag = TAGS[rng.gen_range(0..TAGS.len())];
        let body = random_body(rng);
        let mut frame = checks::frame(tag, &body);
        if rng.gen_bool(0.1) {
            let len: i32 = [0, 3, 4, 5, -1, i32::MAX, i32::MIN, 512, 513][rng.gen_range(0..9)];
            frame[1..5].copy_from_slice(&len.to_be_bytes());
        }
        out.extend(frame);
    }
    if rng.gen_bool(0.3) {
        let cut = rng.gen_range(0..=out.len());
        out.truncate(cut);
    }
    out
}

/// A startup packet with a known request code and a random body, length mostly right.
fn random_startup(rng: &mut TestRng) -> Vec<u8> {
    let codes = [
        PROTOCOL_3_0,
        PROTOCOL_3_2,
        0x0003_0003,
        0x0002_0000,
        SSL_REQUEST_CODE,
        GSSENC_REQUEST_CODE,
        CANCEL_REQUEST_CODE,
        rng.gen(),
    ];
    let mut body = codes[rng.gen_range(0..codes.len())].to_be_bytes().to_vec();
    body.extend(random_body(rng));
    if rng.gen_bool(0.5) {
        body.push(0);
    }
    let mut len = (body.len() + 4) as i32;
    if rng.gen_bool(0.1) {
        len = [0, 7, 8, 9, -1, i32::MAX, MAX_STARTUP_PACKET_LEN as i32 + 1][rng.gen_range(0..7)];
    }
    let mut out = len.to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A pair of SCRAM client messages assembled from attribute syntax, joined by a NUL.
fn random_scram(rng: &mut TestRng) -> Vec<u8> {
    const GS2: &[&[u8]] = &[b"n,,", b"y,,", b"p=x,,", b"n,a=u,", b"n,", b"x,,", b""];
    const FIRST: &[&[u8]] = &[
        b"n=",
        b"n=user",
        b"r=",
        b"r=abc",
        b"r=a\x7fb",
        b"m=x",
        b"x=1",
        b"1=x",
    ];
    const FINAL: &[&[u8]] = &[
        b"c=biws",
        b"c=eSws",
        b"c=bad",
        b"r=abcfuzzServerNonce0123456789",
        b"r=abc",
        b"x=1",
        b"p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        b"p=AAAA",
        b"p=",
    ];
    let mut out = GS2[rng.gen_range(0..GS2.len())].to_vec();
    for (parts, n, last) in [
        (FIRST, rng.gen_range(0..4), false),
        (FINAL, rng.gen_range(0..5), true),
    ] {
        for i in 0..n {
            if i > 0 {
                out.push(b',');
            }
            if rng.gen_bool(0.05) {
                out.extend(random_bytes(rng, 4));
            } else {
                out.extend_from_slice(parts[rng.gen_range(0..parts.len())]);
            }
        }
        if !last {
            out.push(0);
        }
    }
    out
}

/// Server-first and server-final messages for the key-reuse client, from attribute syntax
/// around the right nonce, salt and iteration count, joined by a NUL.
fn random_scram_server(rng: &mut TestRng, salt_b64: &str) -> Vec<u8> {
    let extended = format!("r={}Srv", checks::SCRAM_CLIENT_NONCE);
    let salt = format!("s={salt_b64}");
    let iterations = format!("i={}", checks::SCRAM_ITERATIONS);
    let first: [&[u8]; 9] = [
        extended.as_bytes(),
        checks::SCRAM_CLIENT_NONCE.as_bytes(),
        b"r=other",
        salt.as_bytes(),
        b"s=!!",
        iterations.as_bytes(),
        b"i=-1",
        b"i=99999999999",
        b"e=x",
    ];
    let last: [&[u8]; 6] = [
        b"v=",
        b"v=AAAA",
        b"v=!!",
        b"e=invalid-proof",
        b"x",
        b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ];
    let mut out = Vec::new();
    for i in 0..rng.gen_range(0..5) {
        if i > 0 {
            out.push(b',');
        }
        if rng.gen_bool(0.05) {
            out.extend(random_bytes(rng, 4));
        } else {
            out.extend_from_slice(first[rng.gen_range(0..first.len())]);
        }
    }
    out.push(0);
    out.extend_from_slice(last[rng.gen_range(0..last.len())]);
    out
}

/// The salt of the fixture's secret, in base64 as a server-first message carries it.
fn fixture_salt_b64(secret: &switchyard_pgwire::auth::ScramSecret) -> String {
    let stored = secret.to_string();
    stored
        .split(['$', ':'])
        .nth(2)
        .expect("stored form has a salt")
        .to_owned()
}

/// The key-reuse client takes a well-formed server-first message (so the checks below get past
/// it) and refuses a signature it cannot verify.
#[test]
fn scram_client_reaches_the_signature_check() {
    let secret = checks::scram_secret();
    let first = format!(
        "r={}Srv,s={},i={}",
        checks::SCRAM_CLIENT_NONCE,
        fixture_salt_b64(&secret),
        checks::SCRAM_ITERATIONS
    );
    let keys = switchyard_pgwire::auth::ScramKeys {
        client_key: [7; 32],
        secret: secret.clone(),
    };
    let client = switchyard_pgwire::auth::ScramKeyClient::with_nonce(keys, checks::SCRAM_CLIENT_NONCE);
    let (waiting, _) = client
        .server_first(first.as_bytes())
        .expect("well-formed server-first");
    assert!(waiting.server_final(b"v=AAAA").is_err());
    assert!(!checks::check_scram_client(&secret, first.as_bytes(), b"v=AAAA"));
}

#[test]
fn seeded_random_inputs() {
    let mut rng = TestRng::new(0x5717_c4ad);
    let secret = checks::scram_secret();
    let salt_b64 = fixture_salt_b64(&secret);
    let mut frames = 0;
    for _ in 0..RANDOM_INPUTS {
        check_all(&random_bytes(&mut rng, 64));

        let stream = random_stream(&mut rng);
        for limits in all_limits() {
            frames += checks::check_stream(&stream, limits, checks::check_frontend_message);
            checks::check_stream(&stream, limits, checks::check_backend_message);
        }
        for limits in checks::take_frame_limits() {
            checks::check_take_frame(&stream, limits, rng.gen_range(1..=64));
        }
        checks::check_startup(&random_startup(&mut rng));
        assert!(checks::check_scram_input(&secret, &random_scram(&mut rng)).is_none());
        assert!(!checks::check_scram_client_input(
            &secret,
            &random_bytes(&mut rng, 64)
        ));
        let server = random_scram_server(&mut rng, &salt_b64);
        assert!(!checks::check_scram_client_input(&secret, &server));
    }
    // The generators reach past framing into the message parsers.
    assert!(frames > RANDOM_INPUTS, "only {frames} frames parsed");
}

/// Valid client-side packets and messages, built with the crate's encoders.
fn valid_startup_packets() -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    let mut out = BytesMut::new();
    for protocol in [PROTOCOL_3_0, PROTOCOL_3_2] {
        StartupMessage {
            protocol,
            params: vec![
                ("user".into(), "app".into()),
                ("database".into(), "shop".into()),
                ("application_name".into(), "psql é".into()),
                ("options".into(), "-c search_path=x".into()),
            ],
        }
        .encode(&mut out);
        packets.push(out.split().to_vec());
    }
    StartupMessage {
        protocol: PROTOCOL_3_0,
        params: vec![],
    }
    .encode(&mut out);
    packets.push(out.split().to_vec());
    for secret in [&[1, 2, 3, 4][..], &[0xab; 32][..]] {
        CancelKey {
            pid: 4242,
            secret: bytes::Bytes::copy_from_slice(secret),
        }
        .encode_request(&mut out);
        packets.push(out.split().to_vec());
    }
    packets.push(
        8i32.to_be_bytes()
            .iter()
            .chain(&SSL_REQUEST_CODE.to_be_bytes())
            .copied()
            .collect(),
    );
    packets
}

fn valid_client_messages() -> Vec<Vec<u8>> {
    let mut out = BytesMut::new();
    let mut msgs = Vec::new();
    frontend::query(&mut out, "select 1; select 'é'");
    msgs.push(out.split().to_vec());
    frontend::password(&mut out, checks::MD5_RESPONSE);
    msgs.push(out.split().to_vec());
    frontend::password(&mut out, b"cleartext password");
    msgs.push(out.split().to_vec());
    frontend::sasl_initial_response(&mut out, "SCRAM-SHA-256", b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
    msgs.push(out.split().to_vec());
    frontend::sasl_response(&mut out, b"c=biws,r=abc,p=AAAA");
    msgs.push(out.split().to_vec());
    frontend::terminate(&mut out);
    msgs.push(out.split().to_vec());
    // Extended protocol, hand-built the way the frontend unit tests do.
    for (tag, body) in [
        (b'P', &b"s1\0select $1\0\0\x01\0\0\0\x17"[..]),
        (b'B', b"\0s1\0\0\0\0\0\0\0"),
        (b'D', b"Ss1\0"),
        (b'E', b"\0\0\0\0\x05"),
        (b'C', b"Pp\0"),
        (b'S', b""),
        (b'd', b"1\t2\n"),
        (b'f', b"oops\0"),
    ] {
        msgs.push(checks::frame(tag, body));
    }
    msgs
}

fn valid_server_messages() -> Vec<Vec<u8>> {
    let mut out = BytesMut::new();
    let mut msgs = Vec::new();
    ErrorResponse::fatal(
        sqlstate::INVALID_PASSWORD,
        "password authentication failed for user \"app\"",
    )
    .with_detail("detail")
    .with_hint("check users.toml")
    .encode(&mut out);
    msgs.push(out.split().to_vec());
    ErrorResponse::new(Severity::Warning, sqlstate::WARNING, "careful").encode(&mut out);
    msgs.push(out.split().to_vec());
    backend::auth_sasl(&mut out, &["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]);
    msgs.push(out.split().to_vec());
    backend::auth_sasl_continue(&mut out, b"r=abc,s=c2FsdA==,i=4096");
    msgs.push(out.split().to_vec());
    backend::auth_sasl_final(&mut out, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    msgs.push(out.split().to_vec());
    backend::auth_md5(&mut out, [1, 2, 3, 4]);
    msgs.push(out.split().to_vec());
    backend::auth_ok(&mut out);
    msgs.push(out.split().to_vec());
    backend::parameter_status(&mut out, "server_version", "16.2");
    msgs.push(out.split().to_vec());
    for status in [
        TransactionStatus::Idle,
        TransactionStatus::InTransaction,
        TransactionStatus::Failed,
    ] {
        backend::ready_for_query(&mut out, status);
        msgs.push(out.split().to_vec());
    }
    msgs.push(checks::frame(b'K', b"\0\0\x10\x92\x01\x02\x03\x04"));
    msgs
}

/// Length values that sit on the decoders' boundaries.
fn corrupt_lengths(actual: usize) -> Vec<i32> {
    let a = actual as i32;
    let mut v = vec![
        i32::MIN,
        -1,
        0,
        1,
        3,
        4,
        5,
        7,
        8,
        9,
        a - 1,
        a + 1,
        a + 100,
        i32::MAX,
    ];
    v.extend([
        511,
        512,
        513,
        MAX_STARTUP_PACKET_LEN as i32,
        MAX_STARTUP_PACKET_LEN as i32 + 1,
    ]);
    v
}

/// Every single-bit flip, every truncation, every boundary value in the length field at
/// `len_at`, and some seeded random edits of `valid`, each passed to `check`.
fn mutate(valid: &[u8], len_at: usize, rng: &mut TestRng, mut check: impl FnMut(&[u8])) -> usize {
    let mut count = 0;
    let mut run = |m: &[u8]| {
        check(m);
        count += 1;
    };
    let mut m = valid.to_vec();
    for i in 0..m.len() * 8 {
        m[i / 8] ^= 1 << (i % 8);
        run(&m);
        m[i / 8] ^= 1 << (i % 8);
    }
    for cut in 0..valid.len() {
        run(&valid[..cut]);
    }
    for len in corrupt_lengths(valid.len() - len_at) {
        m.copy_from_slice(valid);
        m[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        run(&m);
    }
    for _ in 0..200 {
        let mut m = valid.to_vec();
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(0..=m.len());
            match rng.gen_range(0..4) {
                0 if at < m.len() => m[at] = rng.gen(),
                1 if at < m.len() => {
                    m.remove(at);
                }
                2 => m.insert(at, INTERESTING[rng.gen_range(0..INTERESTING.len())]),
                _ => m.truncate(at),
            }
        }
        run(&m);
    }
    count
}

#[test]
fn mutated_startup_packets() {
    let mut rng = TestRng::new(1);
    for packet in valid_startup_packets() {
        checks::check_startup(&packet);
        assert!(matches!(switchyard_pgwire::startup::decode(&packet), Ok(Some((_, n))) if n == packet.len()));
        mutate(&packet, 0, &mut rng, checks::check_startup);
        // Two packets back to back: only the first one is decoded.
        let twice = [&packet[..], &packet[..]].concat();
        mutate(&twice, 0, &mut rng, checks::check_startup);
    }
}

#[test]
fn mutated_client_messages() {
    let mut rng = TestRng::new(2);
    let msgs = valid_client_messages();
    for msg in &msgs {
        let parsed = checks::check_stream(msg, MessageLimits::default(), |tag, body| {
            assert!(
                frontend::parse(tag, body).is_ok(),
                "valid message rejected: {msg:?}"
            );
            checks::check_frontend_message(tag, body);
        });
        assert_eq!(parsed, 1);
        mutate(msg, 1, &mut rng, check_all);
    }
    let stream = msgs.concat();
    assert_eq!(
        checks::check_stream(&stream, MessageLimits::default(), checks::check_frontend_message),
        msgs.len()
    );
    for (i, msg) in msgs.iter().enumerate() {
        // Corrupt one frame in the middle of the stream, including its length field.
        let at: usize = msgs[..i].iter().map(Vec::len).sum();
        let n = mutate(msg, 1, &mut rng, |m| {
            let mut corrupted = stream[..at].to_vec();
            corrupted.extend_from_slice(m);
            corrupted.extend_from_slice(&stream[at + msg.len()..]);
            check_all(&corrupted);
        });
        assert!(n > 200);
    }
}

#[test]
fn mutated_server_messages() {
    let mut rng = TestRng::new(3);
    let msgs = valid_server_messages();
    for msg in &msgs {
        let parsed = checks::check_stream(msg, MessageLimits::default(), |tag, body| {
            assert!(
                backend::parse(tag, body).is_ok(),
                "valid message rejected: {msg:?}"
            );
            checks::check_backend_message(tag, body);
        });
        assert_eq!(parsed, 1);
        mutate(msg, 1, &mut rng, check_all);
    }
    let stream = msgs.concat();
    assert_eq!(
        checks::check_stream(&stream, MessageLimits::default(), checks::check_backend_message),
        msgs.len()
    );
    mutate(&stream, 1, &mut rng, check_all);
}

/// Bodies handed straight to the auth-phase parsers, with the length inside
/// SASLInitialResponse corrupted.
#[test]
fn mutated_sasl_initial_response_lengths() {
    let mut rng = TestRng::new(4);
    let mut out = BytesMut::new();
    frontend::sasl_initial_response(&mut out, "SCRAM-SHA-256", b"n,,n=,r=abc");
    let body = out[5..].to_vec();
    let len_at = "SCRAM-SHA-256".len() + 1;
    let check = |b: &[u8]| {
        checks::check_sasl_initial_response(b);
        checks::check_password(b);
        checks::check_frontend_message(b'p', b);
    };
    check(&body);
    mutate(&body, len_at, &mut rng, check);
    checks::check_md5(checks::MD5_RESPONSE);
}

/// A real client (postgres-protocol, as tokio-postgres uses it) completes the exchange; no
/// single-bit flip or truncation of its messages is accepted.
#[test]
fn mutated_scram_exchange() {
    let mut rng = TestRng::new(5);
    let secret = checks::scram_secret();
    let mut client = ScramSha256::new(checks::SCRAM_PASSWORD.as_bytes(), ChannelBinding::unsupported());
    let first = client.message().to_vec();
    let server = switchyard_pgwire::auth::ScramServer::with_nonce(secret.clone(), checks::SCRAM_SERVER_NONCE)
        .and_then(|s| s.client_first(&first))
        .unwrap();
    client.update(server.server_first_message()).unwrap();
    let last = client.message().to_vec();
    let server_final = checks::check_scram(&secret, &first, &last).expect("real client accepted");
    client.finish(&server_final).unwrap();

    // Only the GS2 flag ('n' / 'y') is outside what the proof covers.
    let same = |f: &[u8], l: &[u8]| l == last && f.get(1..) == first.get(1..);
    mutate(&first, 0, &mut rng, |f| {
        let accepted = checks::check_scram(&secret, f, &last).is_some();
        assert!(
            !accepted || same(f, &last),
            "mutated client-first accepted: {f:?}"
        );
    });
    mutate(&last, 0, &mut rng, |l| {
        let accepted = checks::check_scram(&secret, &first, l).is_some();
        assert!(
            !accepted || same(&first, l),
            "mutated client-final accepted: {l:?}"
        );
    });
}

/// Runs one fuzz input through the checks of the fuzz target it belongs to.
fn run_fuzz_input(target: &str, data: &[u8]) {
    match target {
        "decode_startup" => checks::check_startup(data),
        "client_stream" => {
            checks::check_stream(data, checks::SMALL_LIMITS, checks::check_frontend_message);
        }
        "server_stream" => {
            checks::check_stream(data, checks::SMALL_LIMITS, checks::check_backend_message);
        }
        "scram_exchange" => {
            assert!(checks::check_scram_input(&checks::scram_secret(), data).is_none());
        }
        "scram_client" => {
            assert!(!checks::check_scram_client_input(&checks::scram_secret(), data));
        }
        "take_frame" => checks::check_take_frame_input(data),
        "error_fields" => checks::check_error_body(data),
        "command_tag" => checks::check_command_tag(data),
        other => panic!("no fuzz target named {other}"),
    }
}

/// The fuzz seeds and every saved reproducer (`fuzz/seeds/<target>/*`,
/// `fuzz/regressions/<target>/*`) through the same checks as the fuzz targets, so a crash
/// found by fuzzing stays covered by plain `cargo test` once it is saved.
#[test]
fn fuzz_seeds_and_regressions() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seen = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(targets) = std::fs::read_dir(root.join(kind)) else {
            continue;
        };
        for target in targets {
            let target = target.unwrap().path();
            let name = target.file_name().unwrap().to_string_lossy().into_owned();
            for input in std::fs::read_dir(&target).unwrap() {
                let path = input.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let result = std::panic::catch_unwind(|| run_fuzz_input(&name, &data));
                assert!(result.is_ok(), "{} fails: {data:02x?}", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen > 0, "no fuzz seeds found under {}", root.display());
}
