//! Tests of [`FaultProxy`] relaying to the local PostgreSQL server
//! ([`pg_url`]), driven with tokio-postgres. Every wait is bounded, so a
//! broken injector fails a test instead of hanging it.

// Helpers outside `#[test]` functions are not covered by clippy.toml's
// allow-*-in-tests; a failing helper should fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::time::{Duration, Instant};

use switchyard_test_support::{init_tracing, pg_url, FaultProxy};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

/// Bound on anything that should just work.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long a blackholed request must stay unanswered.
const HANG: Duration = Duration::from_millis(300);
/// How fast a reset or a refusal must surface.
const PROMPT: Duration = Duration::from_secs(1);

/// The shared server's TCP address, from [`pg_url`].
fn upstream() -> SocketAddr {
    let config: Config = pg_url().parse().unwrap();
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        other => panic!("{} must name a TCP host, not {other:?}", pg_url()),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    (host.as_str(), port).to_socket_addrs().unwrap().next().unwrap()
}

/// The shared server's credentials, aimed at `addr`.
fn config_for(addr: SocketAddr) -> Config {
    let admin: Config = pg_url().parse().unwrap();
    let mut config = Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(admin.get_user().unwrap_or("postgres"))
        .dbname(admin.get_dbname().unwrap_or("postgres"));
    if let Some(password) = admin.get_password() {
        config.password(password);
    }
    config
}

async fn connect(addr: SocketAddr) -> Result<Client, tokio_postgres::Error> {
    Ok(connect_watched(addr).await?.0)
}

/// A client, and its connection task (whose result says how the socket died).
async fn connect_watched(
    addr: SocketAddr,
) -> Result<(Client, JoinHandle<Result<(), tokio_postgres::Error>>), tokio_postgres::Error> {
    let (client, connection) = config_for(addr).connect(NoTls).await?;
    Ok((client, tokio::spawn(connection)))
}

/// Whether `err` comes from a TCP reset (not a clean close): `ECONNRESET`,
/// or `EPIPE` when the client wrote after the reset arrived.
fn is_tcp_reset(err: &tokio_postgres::Error) -> bool {
    let io = std::error::Error::source(err).and_then(|source| source.downcast_ref::<io::Error>());
    io.is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    })
}

/// `fut`'s output, or a panic naming `what` if it takes longer than `limit`.
async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: no outcome within {limit:?}"),
    }
}

async fn select_int(client: &Client, value: i32) -> Result<i32, tokio_postgres::Error> {
    Ok(client.query_one("SELECT $1::int4", &[&value]).await?.get(0))
}

async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Wait until the server no longer lists backend `pid`.
async fn wait_backend_gone(pid: i32) {
    let admin = connect(upstream()).await.unwrap();
    within(PATIENCE, "backend exit", async {
        loop {
            let alive = admin
                .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
                .unwrap()
                .is_some();
            if !alive {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Wait until `proxy` relays exactly `n` connections.
async fn wait_connections(proxy: &FaultProxy, n: usize) {
    within(PATIENCE, &format!("{n} live connections"), async {
        while proxy.connections() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_queries_and_large_rows() {
    init_tracing();
    let proxy = FaultProxy::start(upstream()).await.unwrap();
    assert!(proxy.addr().ip().is_loopback());
    let client = within(PATIENCE, "connect", connect(proxy.addr())).await.unwrap();
    assert_eq!(
        within(PATIENCE, "query", select_int(&client, 42)).await.unwrap(),
        42
    );

    // Larger than one relay chunk in both directions.
    let big = "x".repeat(100_000);
    let echoed: String = within(
        PATIENCE,
        "large row",
        client.query_one("SELECT $1::text", &[&big]),
    )
    .await
    .unwrap()
    .get(0);
    assert_eq!(echoed, big);
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.connections(), 1);

    // A clean client close is relayed to the server and ends the relay.
    let pid = backend_pid(&client).await;
    drop(client);
    wait_connections(&proxy, 0).await;
    wait_backend_gone(pid).await;
}

#[tokio::test]
async fn delay_slows_each_direction() {
    init_tracing();
    let delay = Duration::from_millis(150);
    let proxy = FaultProxy::start(upstream()).await.unwrap();
    let client = within(PATIENCE, "connect", connect(proxy.addr())).await.unwrap();

    proxy.set_delay(delay);
    let started = Instant::now();
    assert_eq!(
        within(PATIENCE, "delayed query", select_int(&client, 1))
            .await
            .unwrap(),
        1
    );
    let delayed = started.elapsed();
    // The request and the reply each wait at least once.
    assert!(
        delayed >= delay * 2,
        "round trip {delayed:?} with delay {delay:?}"
    );

    proxy.set_delay(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(
        within(PATIENCE, "undelayed query", select_int(&client, 2))
            .await
            .unwrap(),
        2
    );
    let undelayed = started.elapsed();
    assert!(undelayed < delay, "round trip {undelayed:?} after delay off");
}

#[tokio::test]
async fn blackhole_holds_traffic_until_lifted() {
    init_tracing();
    let proxy = FaultProxy::start(upstream()).await.unwrap();
    let client = within(PATIENCE, "connect", connect(proxy.addr())).await.unwrap();
    assert_eq!(select_int(&client, 1).await.unwrap(), 1);

    // The relay tasks are parked in read when the blackhole starts.
    proxy.set_blackhole(true);
    let query = select_int(&client, 7);
    tokio::pin!(query);
    assert!(
        tokio::time::timeout(HANG, &mut query).await.is_err(),
        "query answered through a blackhole"
    );
    // New connections are accepted, but their startup goes nowhere.
    let late = connect(proxy.addr());
    tokio::pin!(late);
    assert!(
        tokio::time::timeout(HANG, &mut late).await.is_err(),
        "connection started through a blackhole"
    );
    assert_eq!(proxy.accepted(), 2);
    assert_eq!(proxy.connections(), 2);

    proxy.set_blackhole(false);
    assert_eq!(within(PATIENCE, "held query", query).await.unwrap(), 7);
    let late = within(PATIENCE, "held connect", late).await.unwrap();
    assert_eq!(select_int(&late, 8).await.unwrap(), 8);
    assert_eq!(select_int(&client, 9).await.unwrap(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_kills_both_ends_at_once() {
    init_tracing();
    let proxy = FaultProxy::start(upstream()).await.unwrap();
    let (client, connection) = within(PATIENCE, "connect", connect_watched(proxy.addr()))
        .await
        .unwrap();
    let pid = backend_pid(&client).await;

    proxy.reset_all();
    let failed = within(PROMPT, "query after reset", select_int(&client, 1)).await;
    assert!(failed.is_err(), "query survived reset_all: {failed:?}");
    assert!(client.is_closed());
    // A reset, not a clean close.
    let died = within(PROMPT, "connection task", connection).await.unwrap();
    assert!(died.as_ref().is_err_and(is_tcp_reset), "{died:?}");
    wait_backend_gone(pid).await;
    wait_connections(&proxy, 0).await;

    let fresh = within(PATIENCE, "connect after reset", connect(proxy.addr()))
        .await
        .unwrap();
    assert_eq!(select_int(&fresh, 5).await.unwrap(), 5);
    assert_eq!(proxy.connections(), 1);
}

#[tokio::test]
async fn reset_all_ends_blackholed_connections() {
    init_tracing();
    let proxy = FaultProxy::start(upstream()).await.unwrap();
    let client = within(PATIENCE, "connect", connect(proxy.addr())).await.unwrap();
    let pid = backend_pid(&client).await;

    proxy.set_blackhole(true);
    let query = select_int(&client, 1);
    tokio::pin!(query);
    assert!(tokio::time::timeout(HANG, &mut query).await.is_err());
    // Also one still waiting to dial upstream.
    let late = connect(proxy.addr());
    tokio::pin!(late);
    assert!(tokio::time::timeout(HANG, &mut late).await.is_err());
    assert_eq!(proxy.connections(), 2);

    proxy.reset_all();
    assert!(within(PROMPT, "held query after reset", query).await.is_err());
    assert!(within(PROMPT, "held connect after reset", late).await.is_err());
    wait_connections(&proxy, 0).await;
    wait_backend_gone(pid).await;

    // The blackhole is still on for new connections until lifted.
    proxy.set_blackhole(false);
    let fresh = within(PATIENCE, "connect", connect(proxy.addr())).await.unwrap();
    assert_eq!(select_int(&fresh, 3).await.unwrap(), 3);
}

#[tokio::test]
async fn refuse_rejects_new_connections_only() {
    init_tracing();
    let proxy = FaultProxy::start(upstream()).await.unwrap();
    let before = within(PATIENCE, "connect", connect(proxy.addr())).await.unwrap();

    proxy.set_refuse(true);
    let refused = within(PROMPT, "refused connect", connect(proxy.addr())).await;
    assert!(refused.as_ref().is_err_and(is_tcp_reset), "{refused:?}");
    assert_eq!(proxy.accepted(), 2);
    assert_eq!(proxy.connections(), 1);
    // Connections made earlier keep working.
    assert_eq!(select_int(&before, 4).await.unwrap(), 4);

    proxy.set_refuse(false);
    let after = within(PATIENCE, "connect after refuse", connect(proxy.addr()))
        .await
        .unwrap();
    assert_eq!(select_int(&after, 6).await.unwrap(), 6);
}

/// `read` on a socket that never wrote: a reset is `ECONNRESET`, where a
/// clean close would read 0 bytes.
async fn read_sees_reset(what: &str, socket: &mut TcpStream) {
    let mut buf = [0; 64];
    let read = within(PROMPT, what, socket.read(&mut buf)).await;
    assert!(
        read.as_ref()
            .is_err_and(|err| err.kind() == io::ErrorKind::ConnectionReset),
        "{what}: {read:?}"
    );
}

#[tokio::test]
async fn faults_reach_idle_sockets_as_resets() {
    init_tracing();
    let proxy = FaultProxy::start(upstream()).await.unwrap();

    // Relayed and idle: the server waits for a startup packet. The pause lets
    // the relay dial upstream, so the reset finds both pumps parked in read.
    let mut relayed = TcpStream::connect(proxy.addr()).await.unwrap();
    wait_connections(&proxy, 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.reset_all();
    read_sees_reset("relayed socket after reset_all", &mut relayed).await;

    // Blackholed before it could dial upstream.
    proxy.set_blackhole(true);
    let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
    wait_connections(&proxy, 1).await;
    proxy.reset_all();
    read_sees_reset("blackholed socket after reset_all", &mut held).await;
    proxy.set_blackhole(false);

    proxy.set_refuse(true);
    let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
    read_sees_reset("refused socket", &mut refused).await;
    wait_connections(&proxy, 0).await;
    assert_eq!(proxy.accepted(), 3);
}

#[tokio::test]
async fn drop_stops_listening_and_resets_connections() {
    init_tracing();
    let proxy = FaultProxy::start(upstream()).await.unwrap();
    let addr = proxy.addr();
    let client = within(PATIENCE, "connect", connect(addr)).await.unwrap();
    let pid = backend_pid(&client).await;
    proxy.set_blackhole(true);

    drop(proxy);
    let failed = within(PROMPT, "query after drop", select_int(&client, 1)).await;
    assert!(failed.is_err(), "query survived drop: {failed:?}");
    wait_backend_gone(pid).await;
    within(PATIENCE, "listener closed", async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[test]
fn works_on_a_runtime_the_caller_builds() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let proxy = FaultProxy::start(upstream()).await.unwrap();
        let client = within(PATIENCE, "connect", connect(proxy.addr())).await.unwrap();
        assert_eq!(select_int(&client, 11).await.unwrap(), 11);
    });
    // The runtime, with the relay tasks still on it, goes away without panics.
    drop(runtime);
}
