//! What a client can observe on its socket is what PostgreSQL itself would show it: the same
//! silence, the same messages in the same order. Each test runs its exchange against the server
//! directly and through the proxy, in `passthrough` and in `dual_write`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use switchyard_test_support::wire::{Frontend, Msg, RawConn};
use switchyard_test_support::{server_of, DualEnv, TestProxy};

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
