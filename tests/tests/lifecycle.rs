//! Session lifecycle through the proxy: cancellation, backend identity, termination, abrupt
//! clients, idle timeout, connection limit, graceful drain, a failing OLD store, and the admin
//! API's view of it all.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::BytesMut;
use switchyard_pgwire::startup::{CancelKey, StartupMessage, PROTOCOL_3_0};
use switchyard_test_support::wire::{Frontend, Msg, RawConn};
use switchyard_test_support::{ClusterOptions, ProxyConfig, TestCluster, TestDb, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

/// Bound on every wait in this file.
const WAIT: Duration = Duration::from_secs(10);
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// A proxy in front of a fresh OLD database (and an unused NEW one).
struct Fixture {
    proxy: TestProxy,
    old: TestDb,
    _new: TestDb,
}

impl Fixture {
    async fn start(label: &str, proxy_extra: &[&str]) -> anyhow::Result<Fixture> {
        let (old, new) = TestDb::create_pair(label).await?;
        let mut config = ProxyConfig::passthrough(old.url(), new.url());
        for line in proxy_extra {
            config = config.with_proxy_setting(line);
        }
        let proxy = TestProxy::start(&config).await?;
        Ok(Fixture {
            proxy,
            old,
            _new: new,
        })
    }

    async fn login(&self) -> anyhow::Result<Session> {
        Session::login(self.proxy.addr, self.old.name(), "switchyard-lifecycle").await
    }
}

/// A raw session and the backend key the server gave it.
struct Session {
    conn: RawConn,
    key: CancelKey,
}

impl Session {
    async fn login(addr: SocketAddr, database: &str, application_name: &str) -> anyhow::Result<Session> {
        let mut conn = RawConn::open(addr).await?;
        conn.send(&startup(database, application_name)).await?;
        let greeting = tokio::time::timeout(WAIT, conn.read_until_ready(1)).await??;
        if let Some(err) = greeting.iter().find(|m| m.tag == b'E') {
            bail!("login refused: {:?} {:?}", err.code(), err.field(b'M'));
        }
        let key = greeting
            .iter()
            .find(|m| m.tag == b'K')
            .context("no BackendKeyData")?;
        let key = CancelKey {
            pid: i32::from_be_bytes(key.body[..4].try_into()?),
            secret: key.body.slice(4..),
        };
        Ok(Session { conn, key })
    }

    /// Sends one Query and reads up to its ReadyForQuery.
    async fn query(&mut self, sql: &str) -> anyhow::Result<Vec<Msg>> {
        let mut f = Frontend::new();
        f.query(sql);
        self.conn.send(f.bytes()).await?;
        tokio::time::timeout(WAIT, self.conn.read_until_ready(1))
            .await
            .with_context(|| format!("no answer to {sql}"))?
    }

    /// Runs `sql`, expects no error, returns the first column of the first row.
    async fn value(&mut self, sql: &str) -> anyhow::Result<String> {
        let msgs = self.query(sql).await?;
        ensure!(!msgs.iter().any(|m| m.tag == b'E'), "{sql} failed: {msgs:?}");
        ensure!(
            msgs.last().is_some_and(|m| m.tag == b'Z'),
            "{sql}: no ReadyForQuery: {msgs:?}"
        );
        let row = msgs.iter().find(|m| m.tag == b'D').context("no row")?;
        let len = i32::from_be_bytes(row.body[2..6].try_into()?);
        let len = usize::try_from(len).context("NULL value")?;
        Ok(String::from_utf8_lossy(&row.body[6..6 + len]).into_owned())
    }

    /// Runs `sql`, expects success, returns the transaction status of the ReadyForQuery.
    async fn ok(&mut self, sql: &str) -> anyhow::Result<u8> {
        let msgs = self.query(sql).await?;
        ensure!(!msgs.iter().any(|m| m.tag == b'E'), "{sql} failed: {msgs:?}");
        let z = msgs
            .last()
            .filter(|m| m.tag == b'Z')
            .context("no ReadyForQuery")?;
        Ok(z.body[0])
    }

    async fn terminate(mut self) -> anyhow::Result<()> {
        self.conn.send(&TERMINATE).await?;
        let rest = self.conn.read_until_closed(WAIT).await?;
        ensure!(rest.is_empty(), "messages after Terminate: {rest:?}");
        Ok(())
    }
}

fn startup(database: &str, application_name: &str) -> BytesMut {
    let mut out = BytesMut::new();
    StartupMessage {
        protocol: PROTOCOL_3_0,
        params: vec![
            ("user".into(), "postgres".into()),
            ("database".into(), database.into()),
            ("application_name".into(), application_name.into()),
        ],
    }
    .encode(&mut out);
    out
}

/// The connection ends with a FATAL `code` as its last message.
async fn expect_fatal_close(conn: &mut RawConn, code: &str) -> anyhow::Result<Vec<Msg>> {
    let msgs = conn.read_until_closed(WAIT).await?;
    let last = msgs
        .last()
        .with_context(|| format!("closed without FATAL {code}"))?;
    ensure!(
        last.tag == b'E'
            && last.code().as_deref() == Some(code)
            && last.field(b'V').as_deref() == Some("FATAL"),
        "expected FATAL {code} before close, got {msgs:?}"
    );
    Ok(msgs)
}

async fn active_connections(proxy: &TestProxy) -> anyhow::Result<i64> {
    let (code, body) = proxy.admin_get("/status").await?;
    ensure!(code == 200, "/status answered {code}: {body}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    status["connections"]["active"]
        .as_i64()
        .with_context(|| format!("no connections.active in {body}"))
}

async fn wait_active(proxy: &TestProxy, want: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let active = active_connections(proxy).await?;
        if active == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "connections.active is {active}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `sql` (one boolean) on a direct connection until it is true.
async fn wait_until(direct: &tokio_postgres::Client, sql: &str, pid: i32, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let done: bool = direct.query_one(sql, &[&pid]).await?.get(0);
        if done {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const PID_ACTIVE: &str =
    "select exists (select 1 from pg_stat_activity where pid = $1 and state = 'active' and query like '%pg_sleep%')";
const PID_GONE: &str = "select not exists (select 1 from pg_stat_activity where pid = $1)";

async fn send_cancel(addr: SocketAddr, key: &CancelKey) -> anyhow::Result<()> {
    let mut out = BytesMut::new();
    key.encode_request(&mut out);
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&out).await?;
    // The proxy answers nothing and closes, as PostgreSQL does.
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await??;
    ensure!(rest.is_empty(), "answer to a CancelRequest: {rest:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_cancel_reaches_the_backend() -> anyhow::Result<()> {
    let fx = Fixture::start("life_cancel", &[]).await?;
    let direct = fx.old.client().await?;
    let client = fx.proxy.client().await?;
    let pid: i32 = client.query_one("select pg_backend_pid()", &[]).await?.get(0);
    let token = client.cancel_token();

    let sleeping = tokio::time::timeout(
        Duration::from_secs(15),
        client.simple_query("select pg_sleep(10)"),
    );
    let cancel = async {
        wait_until(&direct, PID_ACTIVE, pid, "pg_sleep runs").await?;
        // Connects to the proxy: the key is the real backend's, the proxy routes it.
        token.cancel_query(NoTls).await?;
        anyhow::Ok(Instant::now())
    };
    let (result, cancelled_at) = tokio::join!(sleeping, cancel);
    let cancelled_at = cancelled_at?;
    let err = result
        .context("pg_sleep was not cancelled")?
        .expect_err("pg_sleep should have been cancelled");
    ensure!(
        cancelled_at.elapsed() < Duration::from_secs(3),
        "cancel took {:?}",
        cancelled_at.elapsed()
    );
    let db = err.as_db_error().with_context(|| format!("{err:?}"))?;
    assert_eq!(db.code().code(), "57014", "{db:?}");
    assert_eq!(db.message(), "canceling statement due to user request");

    // The session goes on.
    let row = client.query_one("select 6 * 7", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_a_wrong_key_does_nothing() -> anyhow::Result<()> {
    let fx = Fixture::start("life_badcancel", &[]).await?;
    let direct = fx.old.client().await?;
    let mut s = fx.login().await?;
    let addr = fx.proxy.addr;

    let mut f = Frontend::new();
    f.query("select pg_sleep(1.5)");
    let started = Instant::now();
    s.conn.send(f.bytes()).await?;
    wait_until(&direct, PID_ACTIVE, s.key.pid, "pg_sleep runs").await?;
    let mut wrong_secret = s.key.secret.to_vec();
    for b in &mut wrong_secret {
        *b ^= 0xff;
    }
    for key in [
        CancelKey {
            pid: s.key.pid,
            secret: wrong_secret.into(),
        },
        CancelKey {
            pid: s.key.pid.wrapping_add(1),
            secret: s.key.secret.clone(),
        },
        CancelKey {
            pid: 0,
            secret: vec![0; 4].into(),
        },
    ] {
        send_cancel(addr, &key).await?;
    }
    let msgs = tokio::time::timeout(WAIT, s.conn.read_until_ready(1)).await??;
    ensure!(
        !msgs.iter().any(|m| m.tag == b'E'),
        "query was disturbed: {msgs:?}"
    );
    ensure!(msgs.iter().any(|m| m.tag == b'D'), "no row: {msgs:?}");
    ensure!(
        started.elapsed() >= Duration::from_millis(1400),
        "pg_sleep ended early"
    );

    // The right key, sent raw, does cancel.
    let mut f = Frontend::new();
    f.query("select pg_sleep(10)");
    s.conn.send(f.bytes()).await?;
    wait_until(&direct, PID_ACTIVE, s.key.pid, "pg_sleep runs").await?;
    send_cancel(addr, &s.key).await?;
    let msgs = tokio::time::timeout(Duration::from_secs(3), s.conn.read_until_ready(1)).await??;
    let codes: Vec<String> = msgs.iter().filter_map(Msg::code).collect();
    assert_eq!(codes, ["57014"]);
    assert_eq!(s.value("select 'still here'").await?, "still here");
    s.terminate().await?;
    wait_active(&fx.proxy, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sees_the_real_backend_pid_and_its_application_name() -> anyhow::Result<()> {
    let fx = Fixture::start("life_pid", &[]).await?;
    let app = format!("sy-life-{:08x}", rand::random::<u32>());
    let mut s = Session::login(fx.proxy.addr, fx.old.name(), &app).await?;
    let pid: i32 = s.value("select pg_backend_pid()").await?.parse()?;
    assert_eq!(
        pid, s.key.pid,
        "BackendKeyData names the backend serving the session"
    );

    let direct = fx.old.client().await?;
    let row = direct
        .query_one(
            "select application_name, datname::text from pg_stat_activity where pid = $1",
            &[&pid],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), app);
    assert_eq!(row.get::<_, String>(1), fx.old.name());
    assert_eq!(s.value("show application_name").await?, app);
    s.terminate().await?;
    wait_until(&direct, PID_GONE, pid, "the backend exits after Terminate").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backend_reaches_the_client_as_57p01() -> anyhow::Result<()> {
    let fx = Fixture::start("life_term", &[]).await?;
    let mut healthy = fx.login().await?;
    let mut victim = fx.login().await?;
    victim.ok("begin").await?;
    wait_active(&fx.proxy, 2).await?;

    let direct = fx.old.client().await?;
    let done: bool = direct
        .query_one("select pg_terminate_backend($1)", &[&victim.key.pid])
        .await?
        .get(0);
    assert!(done);
    let msgs = expect_fatal_close(&mut victim.conn, "57P01").await?;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(
        msgs[0].field(b'M').as_deref(),
        Some("terminating connection due to administrator command")
    );
    wait_active(&fx.proxy, 1).await?;

    assert_eq!(healthy.value("select 'alive'").await?, "alive");
    healthy.terminate().await?;
    wait_active(&fx.proxy, 0).await
}

/// Logs in on a plain socket that resets (RST) instead of closing when dropped.
async fn resetting_session(addr: SocketAddr, database: &str) -> anyhow::Result<(TcpStream, i32)> {
    let mut stream = TcpStream::connect(addr).await?;
    // A zero linger never blocks on drop: the kernel discards the send queue and resets.
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO))?;
    stream.write_all(&startup(database, "sy-reset")).await?;
    let greeting = read_raw_until_ready(&mut stream).await?;
    let key = greeting
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .context("no BackendKeyData")?;
    let pid = i32::from_be_bytes(key.1[..4].try_into()?);
    Ok((stream, pid))
}

async fn read_raw_until_ready(stream: &mut TcpStream) -> anyhow::Result<Vec<(u8, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut msgs = Vec::new();
    loop {
        while buf.len() >= 5 {
            let len = usize::try_from(i32::from_be_bytes(buf[1..5].try_into()?))? + 1;
            if buf.len() < len {
                break;
            }
            let frame: Vec<u8> = buf.drain(..len).collect();
            let tag = frame[0];
            msgs.push((tag, frame[5..].to_vec()));
            ensure!(tag != b'E', "error: {:?}", String::from_utf8_lossy(&frame[5..]));
            if tag == b'Z' {
                return Ok(msgs);
            }
        }
        let n = tokio::time::timeout(WAIT, stream.read_buf(&mut buf)).await??;
        ensure!(n > 0, "closed early");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_client_disconnect_ends_its_backend() -> anyhow::Result<()> {
    let fx = Fixture::start("life_abrupt", &[]).await?;
    fx.old.execute_batch("create table t (id int)").await?;
    let direct = fx.old.client().await?;
    let mut healthy = fx.login().await?;

    // Closed (FIN) inside an open transaction holding a lock.
    let mut s = fx.login().await?;
    assert_eq!(
        s.ok("begin; insert into t values (1); lock table t in access exclusive mode")
            .await?,
        b'T'
    );
    let pid = s.key.pid;
    drop(s);
    wait_until(&direct, PID_GONE, pid, "the backend of a closed client exits").await?;

    // Reset (RST) inside an open transaction.
    let (mut stream, pid) = resetting_session(fx.proxy.addr, fx.old.name()).await?;
    let mut f = Frontend::new();
    f.query("begin; insert into t values (2); lock table t in access exclusive mode");
    stream.write_all(f.bytes()).await?;
    let answer = read_raw_until_ready(&mut stream).await?;
    assert_eq!(answer.last().map(|(_, body)| body.as_slice()), Some(&b"T"[..]));
    drop(stream);
    wait_until(&direct, PID_GONE, pid, "the backend of a reset client exits").await?;

    // Both transactions rolled back and their locks are gone.
    direct.batch_execute("set lock_timeout = '5s'").await?;
    let n: i64 = direct.query_one("select count(*) from t", &[]).await?.get(0);
    assert_eq!(n, 0);
    wait_active(&fx.proxy, 1).await?;
    assert_eq!(healthy.value("select 'alive'").await?, "alive");
    healthy.terminate().await?;
    wait_active(&fx.proxy, 0).await
}

/// Waits for the idle-timeout FATAL and returns how long after `since` it came.
async fn expect_idle_timeout(s: &mut Session, since: Instant) -> anyhow::Result<Duration> {
    let msgs = expect_fatal_close(&mut s.conn, "57P05").await?;
    let elapsed = since.elapsed();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(
        msgs[0].field(b'M').as_deref(),
        Some("terminating connection due to idle-session timeout")
    );
    ensure!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "idle timeout of 1 s fired after {elapsed:?}"
    );
    Ok(elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_session_idle_since_login() -> anyhow::Result<()> {
    let fx = Fixture::start("life_idle", &["client_idle_timeout_secs = 1"]).await?;
    let since = Instant::now();
    let mut s = fx.login().await?;
    expect_idle_timeout(&mut s, since).await?;
    wait_active(&fx.proxy, 0).await?;
    // The proxy goes on serving.
    let mut next = fx.login().await?;
    assert_eq!(next.value("select 'next'").await?, "next");
    next.terminate().await
}

/// The idle clock must restart after every request, not only at login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_session_idle_after_queries() -> anyhow::Result<()> {
    let fx = Fixture::start("life_idle_q", &["client_idle_timeout_secs = 1"]).await?;
    let mut s = fx.login().await?;
    assert_eq!(s.value("select 'one'").await?, "one");
    let since = Instant::now();
    expect_idle_timeout(&mut s, since).await?;

    // Same after a transaction has ended.
    let mut s = fx.login().await?;
    s.ok("begin").await?;
    assert_eq!(s.ok("commit").await?, b'I');
    let since = Instant::now();
    expect_idle_timeout(&mut s, since).await?;
    wait_active(&fx.proxy, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_spares_open_transactions() -> anyhow::Result<()> {
    let fx = Fixture::start("life_idle_tx", &["client_idle_timeout_secs = 1"]).await?;
    let mut s = fx.login().await?;
    assert_eq!(s.ok("begin").await?, b'T');
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(s.value("select 'in transaction'").await?, "in transaction");
    // A failed transaction is still a transaction.
    let msgs = s.query("select 1/0").await?;
    assert_eq!(msgs.last().map(|m| m.body[0]), Some(b'E'));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(s.ok("rollback").await?, b'I');
    s.terminate().await
}

/// Sends Parse/Bind/Execute/Flush (no Sync) for `sql` and reads its results: the server is then
/// inside the implicit transaction of an unfinished extended-protocol batch.
async fn unsynced_batch(s: &mut Session, sql: &str) -> anyhow::Result<()> {
    let mut f = Frontend::new();
    f.parse("", sql, &[])
        .bind("", "", &[], &[], &[])
        .execute("", 0)
        .flush();
    s.conn.send(f.bytes()).await?;
    for want in [b'1', b'2', b'C'] {
        let msg = tokio::time::timeout(WAIT, s.conn.read_msg())
            .await??
            .context("closed inside the batch")?;
        ensure!(msg.tag == want, "expected {:?}, got {msg:?}", want as char);
    }
    Ok(())
}

/// Sends Sync and expects ReadyForQuery (idle).
async fn sync(s: &mut Session) -> anyhow::Result<()> {
    let mut f = Frontend::new();
    f.sync();
    s.conn.send(f.bytes()).await?;
    let msgs = tokio::time::timeout(WAIT, s.conn.read_until_ready(1)).await??;
    ensure!(
        msgs.len() == 1 && msgs[0].tag == b'Z' && &msgs[0].body[..] == b"I",
        "after Sync: {msgs:?}"
    );
    Ok(())
}

/// PostgreSQL arms `idle_session_timeout` only when it sends ReadyForQuery; between Execute and
/// Sync the session is inside an implicit transaction and must not be timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_spares_an_unsynced_extended_batch() -> anyhow::Result<()> {
    let fx = Fixture::start("life_idle_ext", &["client_idle_timeout_secs = 1"]).await?;
    fx.old.execute_batch("create table t (id int)").await?;
    let mut s = fx.login().await?;
    unsynced_batch(&mut s, "insert into t values (1)").await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sync(&mut s).await?;
    let n: i64 = fx.old.query_i64("select count(*) from t").await?;
    assert_eq!(n, 1, "the batch committed at Sync");
    s.terminate().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_extra_client() -> anyhow::Result<()> {
    let fx = Fixture::start("life_max", &["max_connections = 2"]).await?;
    let mut a = fx.login().await?;
    let b = fx.login().await?;

    let mut third = RawConn::open(fx.proxy.addr).await?;
    third.send(&startup(fx.old.name(), "third")).await?;
    let msgs = expect_fatal_close(&mut third, "53300").await?;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(
        msgs[0].field(b'M').as_deref(),
        Some("sorry, too many clients already")
    );

    assert_eq!(a.value("select 'a'").await?, "a");
    b.terminate().await?;
    // The freed slot is usable once the session has ended.
    let deadline = Instant::now() + WAIT;
    let mut c = loop {
        match fx.login().await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.context("slot not released")),
        }
    };
    assert_eq!(c.value("select 'c'").await?, "c");
    c.terminate().await?;
    a.terminate().await?;
    wait_active(&fx.proxy, 0).await
}

/// A new connection during a drain must not get a session.
async fn expect_refused_while_draining(addr: SocketAddr, database: &str) -> anyhow::Result<()> {
    let Ok(mut conn) = RawConn::open(addr).await else {
        return Ok(()); // listener closed
    };
    if conn.send(&startup(database, "late")).await.is_err() {
        return Ok(());
    }
    let msgs = conn.read_until_closed(WAIT).await?;
    ensure!(
        !msgs.iter().any(|m| m.tag == b'Z'),
        "a session started during the drain: {msgs:?}"
    );
    if let Some(err) = msgs.iter().find(|m| m.tag == b'E') {
        assert_eq!(err.code().as_deref(), Some("57P03"), "{err:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_lets_transactions_finish() -> anyhow::Result<()> {
    let mut fx = Fixture::start("life_drain", &[]).await?;
    fx.old.execute_batch("create table t (id int)").await?;
    let mut idle = fx.login().await?;
    let mut busy = fx.login().await?;
    assert_eq!(busy.ok("begin; insert into t values (1)").await?, b'T');

    let drained_at = Instant::now();
    fx.proxy.drain(Duration::from_secs(10));

    let msgs = expect_fatal_close(&mut idle.conn, "57P01").await?;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    ensure!(
        drained_at.elapsed() < Duration::from_secs(2),
        "idle session closed after {:?}",
        drained_at.elapsed()
    );

    expect_refused_while_draining(fx.proxy.addr, fx.old.name()).await?;

    // The transaction goes on and commits.
    assert_eq!(busy.value("select count(*) from t").await?, "1");
    assert_eq!(busy.ok("insert into t values (2)").await?, b'T');
    let mut f = Frontend::new();
    f.query("commit");
    busy.conn.send(f.bytes()).await?;
    let msgs = expect_fatal_close(&mut busy.conn, "57P01").await?;
    let tags: Vec<u8> = msgs.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"CZE", "{msgs:?}");
    assert_eq!(&msgs[0].body[..], b"COMMIT\0");
    assert_eq!(&msgs[1].body[..], b"I");

    fx.proxy.join().await?;
    let n: i64 = fx.old.query_i64("select count(*) from t").await?;
    assert_eq!(n, 2, "the drained transaction committed");
    Ok(())
}

/// A drain ends sessions at their next idle point: an extended-protocol batch that has not been
/// synced yet is an implicit transaction, not an idle point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_waits_for_sync() -> anyhow::Result<()> {
    let mut fx = Fixture::start("life_drain_ext", &[]).await?;
    fx.old.execute_batch("create table t (id int)").await?;
    let mut s = fx.login().await?;
    unsynced_batch(&mut s, "insert into t values (1)").await?;
    fx.proxy.drain(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    sync(&mut s).await?;
    expect_fatal_close(&mut s.conn, "57P01").await?;
    fx.proxy.join().await?;
    let n: i64 = fx.old.query_i64("select count(*) from t").await?;
    assert_eq!(n, 1, "the batch committed at Sync");
    Ok(())
}

/// While draining, the admin API says so, so a load balancer takes the proxy out of rotation
/// (admin.rs has a 503 "draining" answer for exactly this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_reports_a_drain_in_progress() -> anyhow::Result<()> {
    let mut fx = Fixture::start("life_drain_admin", &[]).await?;
    let mut busy = fx.login().await?;
    assert_eq!(busy.ok("begin").await?, b'T');
    fx.proxy.drain(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let health = fx.proxy.admin_get("/health").await;
    let status = fx.proxy.admin_get("/status").await;
    // Let the session finish whatever the outcome, so the proxy stops.
    busy.ok("commit").await?;
    expect_fatal_close(&mut busy.conn, "57P01").await?;
    fx.proxy.join().await?;

    let (code, body) = health.context("/health unreachable during the drain")?;
    assert_eq!(code, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(health["status"], "draining", "{body}");
    let (code, body) = status.context("/status unreachable during the drain")?;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(status["state"], "draining", "{body}");
    assert_eq!(status["connections"]["active"], 1, "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_a_stuck_transaction() -> anyhow::Result<()> {
    let mut fx = Fixture::start("life_deadline", &[]).await?;
    fx.old.execute_batch("create table t (id int)").await?;
    let mut stuck = fx.login().await?;
    assert_eq!(stuck.ok("begin; insert into t values (1)").await?, b'T');

    let drained_at = Instant::now();
    fx.proxy.drain(Duration::from_secs(1));
    let msgs = expect_fatal_close(&mut stuck.conn, "57P01").await?;
    let elapsed = drained_at.elapsed();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    ensure!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "grace of 1 s ended after {elapsed:?}"
    );
    fx.proxy.join().await?;

    let direct = fx.old.client().await?;
    wait_until(
        &direct,
        PID_GONE,
        stuck.key.pid,
        "the cut session's backend exits",
    )
    .await?;
    let n: i64 = direct.query_one("select count(*) from t", &[]).await?.get(0);
    assert_eq!(n, 0, "the cut transaction rolled back");
    Ok(())
}

async fn wait_health(proxy: &TestProxy, want: u16) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = proxy.admin_get("/health").await?;
        if code == want {
            return Ok(body);
        }
        ensure!(
            Instant::now() < deadline,
            "/health stays {code}, want {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_store_going_away_mid_session() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await?;
    let old = TestDb::create_at(&cluster.url("postgres"), "life_store").await?;
    let new = TestDb::create("life_store_new").await?;
    let proxy = TestProxy::passthrough(old.url(), new.url()).await?;
    let login = || Session::login(proxy.addr, old.name(), "sy-store");

    let body = wait_health(&proxy, 200).await?;
    let health: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(health["status"], "ok", "{body}");

    // Clean stop: PostgreSQL tells its sessions why, and the proxy forwards it.
    let mut s = login().await?;
    assert_eq!(s.value("select 'up'").await?, "up");
    cluster.stop().await?;
    let msgs = expect_fatal_close(&mut s.conn, "57P01").await?;
    assert_eq!(msgs.len(), 1, "{msgs:?}");

    let body = wait_health(&proxy, 503).await?;
    let health: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(health["old"]["ok"], false, "{body}");
    wait_active(&proxy, 0).await?;
    // New sessions are refused with 08001 while the store is down.
    let mut refused = RawConn::open(proxy.addr).await?;
    refused.send(&startup(old.name(), "refused")).await?;
    let msgs = expect_fatal_close(&mut refused, "08001").await?;
    assert_eq!(msgs.len(), 1, "{msgs:?}");

    cluster.start_again().await?;
    let mut s = login().await?;
    assert_eq!(s.value("select 'back'").await?, "back");
    wait_health(&proxy, 200).await?;

    // Crash: no goodbye from the server; the client is told or simply closed.
    cluster.kill().await?;
    let msgs = s.conn.read_until_closed(WAIT).await?;
    ensure!(
        msgs.iter()
            .all(|m| m.tag == b'E' && m.field(b'V').as_deref() == Some("FATAL")),
        "after a crash: {msgs:?}"
    );
    wait_active(&proxy, 0).await?;
    cluster.start_again().await?;
    let mut s = login().await?;
    assert_eq!(s.value("select 'recovered'").await?, "recovered");
    s.terminate().await?;
    wait_active(&proxy, 0).await?;
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_after_traffic() -> anyhow::Result<()> {
    let fx = Fixture::start("life_metrics", &[]).await?;
    let (code, body) = fx.proxy.admin_get("/health").await?;
    assert_eq!(code, 200, "{body}");

    let client = fx.proxy.client().await?;
    client.simple_query("select 1").await?;
    client.query("select $1::int", &[&1i32]).await?;
    client
        .batch_execute("create table t (id int); insert into t values (1)")
        .await?;
    assert!(client.simple_query("select 1/0").await.is_err());
    drop(client);
    // A client the proxy throws out.
    let mut bad = fx.login().await?;
    bad.conn.send(&[b'y', 0, 0, 0, 4]).await?;
    expect_fatal_close(&mut bad.conn, "08P01").await?;
    wait_active(&fx.proxy, 0).await?;

    let (code, metrics) = fx.proxy.admin_get("/metrics").await?;
    assert_eq!(code, 200);
    for needle in [
        "switchyard_connections_total",
        "switchyard_statements_total{kind=\"read\",protocol=\"simple\"}",
        "switchyard_statements_total{kind=\"read\",protocol=\"extended\"}",
        "switchyard_store_latency_seconds_bucket",
        "switchyard_errors_total",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle}:\n{metrics}");
    }
    let connections = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_connections_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(
        connections.is_some_and(|n| n >= 2.0),
        "connections: {connections:?}\n{metrics}"
    );
    assert!(
        metrics.contains("switchyard_errors_total{kind=\"protocol\",source=\"client\"}"),
        "{metrics}"
    );
    Ok(())
}

/// A store whose engine this build cannot proxy stops the start with a cause naming the store
/// and the engine.
#[tokio::test]
async fn an_unsupported_engine_is_refused_at_start_naming_the_store() -> anyhow::Result<()> {
    let old = TestDb::create("life_engine").await?;
    let mut proxy = TestProxy::start(&ProxyConfig::passthrough(
        old.url(),
        "mysql://root@127.0.0.1:3306/x",
    ))
    .await?;
    let e = proxy
        .join()
        .await
        .expect_err("the proxy started with a MySQL NEW");
    let text = format!("{e:#}");
    ensure!(
        text.contains("new.url: the mysql engine is not supported yet"),
        "{text}"
    );
    Ok(())
}
