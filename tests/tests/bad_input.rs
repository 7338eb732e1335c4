//! Malformed and hostile input: every bad session ends with the FATAL ErrorResponse PostgreSQL
//! itself would send (exact SQLSTATE), the connection closes, and the proxy goes on serving.
//!
//! Each test opens a healthy session before the bad one and runs a query on it afterwards, then
//! opens a fresh session, and finally checks that `/status` counts no active connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::{BufMut, BytesMut};
use switchyard_pgwire::startup::{StartupMessage, PROTOCOL_3_0};
use switchyard_test_support::wire::{is_reset, Frontend, Msg, RawConn};
use switchyard_test_support::{ProxyConfig, TestDb, TestProxy};

/// Bound on every wait in this file.
const WAIT: Duration = Duration::from_secs(10);
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

/// A proxy in front of a fresh database, with one healthy session already open.
struct Fixture {
    proxy: TestProxy,
    db: TestDb,
    _new: TestDb,
    healthy: RawConn,
}

impl Fixture {
    async fn start(label: &str, proxy_extra: &[&str]) -> anyhow::Result<Fixture> {
        let (db, new) = TestDb::create_pair(label).await?;
        let mut config = ProxyConfig::passthrough(db.url(), new.url());
        for line in proxy_extra {
            config = config.with_proxy_setting(line);
        }
        let proxy = TestProxy::start(&config).await?;
        let (mut healthy, _) = RawConn::login(proxy.addr, "postgres", db.name()).await?;
        select_42(&mut healthy)
            .await
            .context("healthy session before the bad one")?;
        Ok(Fixture {
            proxy,
            db,
            _new: new,
            healthy,
        })
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.addr
    }

    /// A logged-in raw session on this fixture's database.
    async fn login(&self) -> anyhow::Result<RawConn> {
        Ok(RawConn::login(self.addr(), "postgres", self.db.name()).await?.0)
    }

    /// The healthy session still works, a new one works, and once both end `/status` shows no
    /// active connection.
    async fn finish(self) -> anyhow::Result<()> {
        let Fixture {
            proxy,
            db,
            mut healthy,
            ..
        } = self;
        select_42(&mut healthy)
            .await
            .context("healthy session after the bad one")?;
        let (mut fresh, _) = RawConn::login(proxy.addr, "postgres", db.name()).await?;
        select_42(&mut fresh)
            .await
            .context("new session after the bad one")?;
        for mut conn in [healthy, fresh] {
            conn.send(&[b'X', 0, 0, 0, 4]).await?;
            let rest = conn.read_until_closed(WAIT).await?;
            ensure!(rest.is_empty(), "unexpected messages after Terminate: {rest:?}");
        }
        wait_no_active_connections(&proxy).await?;
        proxy.stop().await
    }
}

/// Runs `select 41 + 1` and checks the single row says 42.
async fn select_42(conn: &mut RawConn) -> anyhow::Result<()> {
    let mut f = Frontend::new();
    f.query("select 41 + 1");
    conn.send(f.bytes()).await?;
    let msgs = tokio::time::timeout(WAIT, conn.read_until_ready(1)).await??;
    let tags: Vec<char> = msgs.iter().map(|m| m.tag as char).collect();
    ensure!(
        tags == ['T', 'D', 'C', 'Z'],
        "unexpected answer to select: {msgs:?}"
    );
    ensure!(msgs[1].body.ends_with(b"42"), "wrong row: {:?}", msgs[1]);
    Ok(())
}

/// Expects exactly one message, a FATAL ErrorResponse with `code`, then the connection closing.
async fn expect_fatal(conn: &mut RawConn, code: &str) -> anyhow::Result<Msg> {
    let msgs = conn.read_until_closed(WAIT).await?;
    match msgs.as_slice() {
        [err] if err.tag == b'E' => {
            ensure!(
                err.code().as_deref() == Some(code),
                "expected SQLSTATE {code}, got {:?}: {:?}",
                err.code(),
                err.field(b'M')
            );
            ensure!(err.field(b'S').as_deref() == Some("FATAL"), "not FATAL: {err:?}");
            ensure!(err.field(b'V').as_deref() == Some("FATAL"), "no V field: {err:?}");
            Ok(err.clone())
        }
        other => bail!("expected one FATAL {code} then close, got {other:?}"),
    }
}

/// Sends bytes the peer may refuse mid-way: a reset while writing is fine, the answer is read
/// afterwards.
async fn send_lenient(conn: &mut RawConn, bytes: &[u8]) -> anyhow::Result<()> {
    match conn.send(bytes).await {
        Err(e) if is_reset(&e) => Ok(()),
        other => other,
    }
}

async fn wait_no_active_connections(proxy: &TestProxy) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = proxy.admin_get("/status").await?;
        ensure!(code == 200, "/status answered {code}: {body}");
        let status: serde_json::Value = serde_json::from_str(&body)?;
        let active = status["connections"]["active"]
            .as_i64()
            .with_context(|| format!("no connections.active in {body}"))?;
        if active == 0 {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "connections.active stuck at {active}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn startup(protocol: i32, params: &[(&str, &str)]) -> BytesMut {
    let mut out = BytesMut::new();
    StartupMessage {
        protocol,
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
    .encode(&mut out);
    out
}

/// A tagged frame with an arbitrary declared length.
fn frame(tag: u8, declared_len: i32, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&declared_len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_below_four_after_login_is_a_protocol_violation() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_len", &[]).await?;
    let mut bad = fx.login().await?;
    bad.send(&frame(b'Q', 3, b"")).await?;
    expect_fatal(&mut bad, "08P01").await?;
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tag_after_login_is_a_protocol_violation() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_tag", &[]).await?;
    let mut bad = fx.login().await?;
    bad.send(&frame(b'y', 4, b"")).await?;
    let err = expect_fatal(&mut bad, "08P01").await?;
    // PostgreSQL's wording (postgres.c: "invalid frontend message type %d").
    assert_eq!(
        err.field(b'M').as_deref(),
        Some("invalid frontend message type 121")
    );
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused_with_program_limit_exceeded() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_big", &["max_message_bytes = 65536"]).await?;

    // Refused as soon as the header is in, without waiting for the body.
    let mut bad = fx.login().await?;
    bad.send(&frame(b'Q', 100_000, b"select ")).await?;
    expect_fatal(&mut bad, "54000").await?;

    // And when the whole message is sent in one go.
    let mut bad = fx.login().await?;
    let mut f = Frontend::new();
    f.query(&format!("select '{}'", "x".repeat(100_000)));
    send_lenient(&mut bad, f.bytes()).await?;
    expect_fatal(&mut bad, "54000").await?;

    // A message just under the limit still passes.
    let mut ok = fx.login().await?;
    let mut f = Frontend::new();
    f.query(&format!("select length('{}')", "x".repeat(60_000)));
    ok.send(f.bytes()).await?;
    let msgs = tokio::time::timeout(WAIT, ok.read_until_ready(1)).await??;
    ensure!(
        msgs.iter().any(|m| m.tag == b'D' && m.body.ends_with(b"60000")),
        "query under the limit failed: {msgs:?}"
    );
    ok.send(&[b'X', 0, 0, 0, 4]).await?;
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_before_startup_is_refused() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_http", &[]).await?;
    let mut bad = RawConn::open(fx.addr()).await?;
    send_lenient(
        &mut bad,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl\r\n\r\n",
    )
    .await?;
    expect_fatal(&mut bad, "08P01").await?;
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_versions_are_refused() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_proto", &[]).await?;
    for (protocol, label) in [(0x0002_0000, "2.0"), (0x0004_0000, "4.0")] {
        let mut bad = RawConn::open(fx.addr()).await?;
        bad.send(&startup(
            protocol,
            &[("user", "postgres"), ("database", fx.db.name())],
        ))
        .await?;
        let err = expect_fatal(&mut bad, "0A000")
            .await
            .with_context(|| format!("protocol {label}"))?;
        let msg = err.field(b'M').unwrap_or_default();
        ensure!(msg.contains(label), "message should name protocol {label}: {msg}");
    }
    fx.finish().await
}

/// PostgreSQL answers a 3.x startup newer than it speaks with NegotiateProtocolVersion (and lists
/// the `_pq_.` options it does not know), then logs in; the client must see that message.
/// <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_minor_versions_are_negotiated_as_postgresql_does() -> anyhow::Result<()> {
    let fx = Fixture::start("neg_proto", &[]).await?;
    let direct_addr: SocketAddr = "127.0.0.1:5432".parse()?;
    for (protocol, label) in [(0x0003_0002, "3.2"), (0x0003_0003, "3.3")] {
        let params = [
            ("user", "postgres"),
            ("database", fx.db.name()),
            ("_pq_.sy_test", "1"),
        ];
        let mut answers = Vec::new();
        for addr in [direct_addr, fx.addr()] {
            let mut conn = RawConn::open(addr).await?;
            conn.send(&startup(protocol, &params)).await?;
            let greeting = tokio::time::timeout(WAIT, conn.read_until_ready(1)).await??;
            conn.send(&[b'X', 0, 0, 0, 4]).await?;
            let negotiate: Vec<Msg> = greeting
                .iter()
                .filter(|m| m.tag != b'S' && m.tag != b'K')
                .cloned()
                .collect();
            answers.push(negotiate);
        }
        let direct = &answers[0];
        ensure!(
            direct.first().is_some_and(|m| m.tag == b'v'),
            "PostgreSQL negotiates {label}: {direct:?}"
        );
        assert_eq!(
            answers[1], answers[0],
            "protocol {label}: proxy answer differs from PostgreSQL's"
        );
    }
    fx.finish().await
}

/// PostgreSQL executes what precedes a broken message before it gives up on the connection, so
/// the proxy must forward the complete messages it already has before answering FATAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_messages_before_a_bad_one_still_run() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_after_ok", &[]).await?;
    fx.db.execute_batch("create table t (id int)").await?;
    let mut bad = fx.login().await?;
    let mut f = Frontend::new();
    f.query("insert into t values (1)").raw(&frame(b'y', 4, b""));
    bad.send(f.bytes()).await?;
    let msgs = bad.read_until_closed(WAIT).await?;
    let tags: Vec<u8> = msgs.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"CZE", "{msgs:?}");
    assert_eq!(msgs[2].code().as_deref(), Some("08P01"));
    let n: i64 = fx.db.query_i64("select count(*) from t").await?;
    assert_eq!(n, 1, "the insert sent before the bad message ran");
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_packet_over_10000_bytes_is_refused() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_bigstart", &[]).await?;
    let filler = "o".repeat(12_000);
    let packet = startup(
        PROTOCOL_3_0,
        &[
            ("user", "postgres"),
            ("database", fx.db.name()),
            ("options", &filler),
        ],
    );
    assert!(packet.len() > 10_000);
    let mut bad = RawConn::open(fx.addr()).await?;
    send_lenient(&mut bad, &packet).await?;
    expect_fatal(&mut bad, "08P01").await?;
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_without_user_is_refused() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_nouser", &[]).await?;
    for params in [
        vec![("database", fx.db.name())],
        vec![("user", ""), ("database", fx.db.name())],
    ] {
        let mut bad = RawConn::open(fx.addr()).await?;
        bad.send(&startup(PROTOCOL_3_0, &params)).await?;
        let err = expect_fatal(&mut bad, "28000").await?;
        assert_eq!(
            err.field(b'M').as_deref(),
            Some("no PostgreSQL user name specified in startup packet")
        );
    }
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_body_of_a_known_tag_is_a_protocol_violation() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_body", &[]).await?;
    // Describe with target 'X'.
    let mut bad = fx.login().await?;
    bad.send(&frame(b'D', 4 + 2, b"X\0")).await?;
    expect_fatal(&mut bad, "08P01").await?;
    // Query whose string has no terminator.
    let mut bad = fx.login().await?;
    bad.send(&frame(b'Q', 4 + 8, b"select 1")).await?;
    expect_fatal(&mut bad, "08P01").await?;
    // Sync with a body.
    let mut bad = fx.login().await?;
    bad.send(&frame(b'S', 4 + 1, b"!")).await?;
    expect_fatal(&mut bad, "08P01").await?;
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_ssl_request_before_the_answer_are_refused() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_sslinject", &[]).await?;
    // CVE-2021-23214: data pipelined behind SSLRequest must not be read as plaintext.
    for request in [SSL_REQUEST, GSSENC_REQUEST] {
        let mut bad = RawConn::open(fx.addr()).await?;
        let mut bytes = request.to_vec();
        bytes.extend_from_slice(&startup(
            PROTOCOL_3_0,
            &[("user", "postgres"), ("database", fx.db.name())],
        ));
        bad.send(&bytes).await?;
        let msgs = bad.read_until_closed(WAIT).await?;
        ensure!(
            !msgs.iter().any(|m| m.tag == b'Z' || m.tag == b'R'),
            "login went ahead after injected bytes: {msgs:?}"
        );
        match msgs.as_slice() {
            [err] if err.tag == b'E' && err.code().as_deref() == Some("08P01") => {}
            other => bail!("expected FATAL 08P01 and close, got {other:?}"),
        }
    }
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests_are_answered_n_then_login_works() -> anyhow::Result<()> {
    let fx = Fixture::start("ok_sslreq", &[]).await?;
    for requests in [
        &[SSL_REQUEST][..],
        &[GSSENC_REQUEST],
        &[GSSENC_REQUEST, SSL_REQUEST],
    ] {
        let mut conn = RawConn::open(fx.addr()).await?;
        for request in requests {
            conn.send(request).await?;
            let answer = tokio::time::timeout(WAIT, conn.read_byte()).await??;
            ensure!(answer == Some(b'N'), "answer to encryption request: {answer:?}");
        }
        conn.send(&startup(
            PROTOCOL_3_0,
            &[("user", "postgres"), ("database", fx.db.name())],
        ))
        .await?;
        let greeting = tokio::time::timeout(WAIT, conn.read_until_ready(1)).await??;
        ensure!(
            greeting.first().map(|m| (m.tag, &m.body[..])) == Some((b'R', &[0, 0, 0, 0][..])),
            "no AuthenticationOk: {greeting:?}"
        );
        ensure!(greeting.last().is_some_and(|m| m.tag == b'Z'), "no ReadyForQuery");
        select_42(&mut conn).await?;
        conn.send(&[b'X', 0, 0, 0, 4]).await?;
    }
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_startup_is_refused() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_repl", &[]).await?;
    for value in ["database", "true"] {
        let mut bad = RawConn::open(fx.addr()).await?;
        bad.send(&startup(
            PROTOCOL_3_0,
            &[
                ("user", "postgres"),
                ("database", fx.db.name()),
                ("replication", value),
            ],
        ))
        .await?;
        expect_fatal(&mut bad, "0A000")
            .await
            .with_context(|| format!("replication={value}"))?;
    }
    // `replication=false` is an ordinary session.
    let mut conn = RawConn::open(fx.addr()).await?;
    conn.send(&startup(
        PROTOCOL_3_0,
        &[
            ("user", "postgres"),
            ("database", fx.db.name()),
            ("replication", "false"),
        ],
    ))
    .await?;
    let greeting = tokio::time::timeout(WAIT, conn.read_until_ready(1)).await??;
    ensure!(
        greeting.last().is_some_and(|m| m.tag == b'Z'),
        "refused: {greeting:?}"
    );
    conn.send(&[b'X', 0, 0, 0, 4]).await?;
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_that_disconnects_does_no_harm() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_silent", &[]).await?;
    for _ in 0..3 {
        let conn = RawConn::open(fx.addr()).await?;
        drop(conn);
    }
    // One that waits a moment before leaving, so the proxy is surely reading from it.
    let conn = RawConn::open(fx.addr()).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(conn);
    fx.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_message_then_disconnect() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_half", &[]).await?;
    // Half a startup packet.
    let mut conn = RawConn::open(fx.addr()).await?;
    let packet = startup(PROTOCOL_3_0, &[("user", "postgres"), ("database", fx.db.name())]);
    conn.send(&packet[..packet.len() / 2]).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(conn);
    // Half a header after login.
    let mut conn = fx.login().await?;
    conn.send(&[b'Q', 0, 0]).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(conn);
    // Half a body after login, inside a transaction.
    let mut conn = fx.login().await?;
    let mut f = Frontend::new();
    f.query("begin");
    conn.send(f.bytes()).await?;
    tokio::time::timeout(WAIT, conn.read_until_ready(1)).await??;
    let mut half = BytesMut::new();
    half.put_u8(b'Q');
    half.put_i32(4 + 32);
    half.put_slice(b"select 1");
    conn.send(&half).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(conn);
    fx.finish().await
}

/// A second SSLRequest (or GSSENCRequest) after the first was answered `N` is refused as
/// PostgreSQL's startup code refuses it (a request of a kind already answered is read as a
/// protocol version, 1234.5679 or 1234.5680): FATAL 0A000, and the connection closes. (The
/// local server answers `S` and `G`, so the comparison cannot be made against it here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_encryption_request_is_refused_as_the_server_refuses_it() -> anyhow::Result<()> {
    let fx = Fixture::start("bad_sslagain", &[]).await?;
    for (request, version) in [(SSL_REQUEST, "1234.5679"), (GSSENC_REQUEST, "1234.5680")] {
        let mut conn = RawConn::open(fx.addr()).await?;
        conn.send(&request).await?;
        let first = tokio::time::timeout(WAIT, conn.read_byte()).await??;
        ensure!(first == Some(b'N'), "first answer {first:?}");
        conn.send(&request).await?;
        let msgs = conn.read_until_closed(WAIT).await?;
        match msgs.as_slice() {
            [err] if err.tag == b'E' && err.code().as_deref() == Some("0A000") => {
                let text = String::from_utf8_lossy(&err.body).into_owned();
                ensure!(
                    text.contains(&format!("unsupported frontend protocol {version}")),
                    "{text}"
                );
            }
            other => bail!("expected FATAL 0A000 and close, got {other:?}"),
        }
    }
    fx.finish().await
}
