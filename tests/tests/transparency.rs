//! What a client can observe on its socket is what PostgreSQL itself would show it: the same
//! silence, the same messages in the same order. Each test runs its exchange against the server
//! directly and through the proxy, in `passthrough` and in `dual_write`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use switchyard_pgwire::startup::{StartupMessage, PROTOCOL_3_2};
use switchyard_test_support::wire::{Frontend, Msg, RawConn};
use switchyard_test_support::{server_of, DualEnv, ProxyConfig, TempDir, TestDb, TestProxy};

/// Bound on every wait in this file.
const WAIT: Duration = Duration::from_secs(10);

/// A client sends Terminate while its statement runs (libpq's `PQfinish` from another thread):
/// the server reads it only once the statement is over, so until then the client's socket stays
/// silent and open (no byte, no end of stream); then the statement's answers come and the
/// connection closes.
async fn terminate_mid_query(addr: SocketAddr, db: &str, path: &str) -> anyhow::Result<()> {
    let (mut conn, _) = RawConn::login(addr, "postgres", db).await?;
    conn.send(Frontend::new().query("SELECT pg_sleep(1.5)").bytes())
        .await?;
    // The server is inside pg_sleep when Terminate arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.send(&[b'X', 0, 0, 0, 4]).await?;
    let early = tokio::time::timeout(Duration::from_millis(800), conn.read_msg()).await;
    ensure!(
        early.is_err(),
        "{path}: the socket became readable while the statement still ran: {early:?}"
    );
    let rest: Vec<Msg> = conn
        .read_until_closed(WAIT)
        .await
        .with_context(|| format!("{path}: after the statement"))?;
    let tags: String = rest.iter().map(|m| m.tag as char).collect();
    ensure!(tags == "TDCZ", "{path}: answers after the statement: {tags}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_during_a_statement_leaves_the_socket_silent_until_the_server_closes() -> anyhow::Result<()>
{
    let env = DualEnv::kv("tr_term").await?;
    let old = &env.old;
    terminate_mid_query(server_of(old.url()), old.name(), "direct").await?;

    let passthrough = TestProxy::passthrough(old.url(), env.new.url()).await?;
    terminate_mid_query(passthrough.addr, old.name(), "passthrough").await?;
    passthrough.stop().await?;

    let dual = env.proxy().await?;
    terminate_mid_query(dual.addr, old.name(), "dual_write").await?;
    dual.stop().await
}

/// The first two messages a server sends after a startup asking for protocol 3.2 with a `_pq_.`
/// option.
async fn negotiation_start(addr: SocketAddr, db: &str) -> anyhow::Result<Vec<Msg>> {
    let mut conn = RawConn::open(addr).await?;
    let mut out = bytes::BytesMut::new();
    StartupMessage {
        protocol: PROTOCOL_3_2,
        params: vec![
            ("user".into(), "postgres".into()),
            ("database".into(), db.into()),
            ("_pq_.switchyard_test".into(), "on".into()),
        ],
    }
    .encode(&mut out);
    conn.send(&out).await?;
    let mut msgs = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(WAIT, conn.read_msg())
            .await??
            .context("closed during the startup")?;
        msgs.push(msg);
    }
    Ok(msgs)
}

/// NegotiateProtocolVersion comes first, before the authentication request, as the server
/// sends it, even when the proxy asks the client for a password (here SCRAM) before it logs in
/// upstream; and it says what the server says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_negotiation_comes_before_authentication() -> anyhow::Result<()> {
    let (old, new) = TestDb::create_pair("tr_negotiate").await?;
    let direct = negotiation_start(server_of(old.url()), old.name()).await?;
    ensure!(direct[0].tag == b'v', "the server's first answer: {direct:?}");
    ensure!(direct[1].tag == b'R', "the server's second answer: {direct:?}");

    let dir = TempDir::new("tr_negotiate")?;
    let users = dir.write(
        "users.toml",
        "[[users]]\nname = \"postgres\"\npassword = \"secret\"\n",
    )?;
    let config = ProxyConfig::passthrough(old.url(), new.url())
        .with_auth("scram-sha-256", &users)
        .with_service_login();
    let proxy = TestProxy::start(&config).await?;
    let proxied = negotiation_start(proxy.addr, old.name()).await?;
    ensure!(
        proxied[0] == direct[0],
        "through the proxy the first answer is {:?}, directly {:?}",
        proxied[0],
        direct[0]
    );
    // The SCRAM request (AuthenticationSASL, code 10) follows.
    ensure!(
        proxied[1].tag == b'R' && proxied[1].body.get(..4) == Some(&[0, 0, 0, 10][..]),
        "through the proxy the second answer is {:?}",
        proxied[1]
    );
    proxy.stop().await
}
