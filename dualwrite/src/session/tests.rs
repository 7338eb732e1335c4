//! The session against a scripted client and a scripted server over in-memory pipes: each test
//! plays both peers message by message and checks what each side receives and how the session
//! ends. The engine has no databases ([`Mirror::for_tests`]): its follower is down, so a
//! mirrored commit takes the path that leaves the intent to the repair loop.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchyard_pgwire::backend::{self, ErrorResponse, Severity, TransactionStatus};
use switchyard_pgwire::frame::{take_frame, MessageLimits};
use switchyard_pgwire::frontend as fe;
use switchyard_pgwire::sqlstate::{self, SqlState};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{relay, SessionEnd, SessionHost, SessionParams, Stop};
use crate::error::SessionError;
use crate::Mirror;

const WAIT: Duration = Duration::from_secs(5);
const TABLE: &str = "public.t";

/// What the session told its host.
#[derive(Debug, Default, Clone)]
struct Counts {
    client_messages: Vec<u8>,
    answered: usize,
    statement_errors: usize,
}

struct TestHost {
    stop: watch::Receiver<Stop>,
    counts: Counts,
}

impl SessionHost for TestHost {
    fn stop(&self) -> Stop {
        *self.stop.borrow()
    }

    async fn stop_changed(&mut self) {
        if self.stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn client_message(&mut self, tag: u8, _body: &[u8]) {
        self.counts.client_messages.push(tag);
    }

    fn answered(&mut self) {
        self.counts.answered += 1;
    }

    fn statement_error(&mut self) {
        self.counts.statement_errors += 1;
    }
}

/// One end of a pipe, read frame by frame.
struct Peer {
    io: DuplexStream,
    buf: BytesMut,
}

impl Peer {
    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write to the session");
    }

    /// Frames up to and including the first one tagged `last`.
    async fn read_until(&mut self, last: u8) -> Vec<(u8, Bytes)> {
        let mut out = Vec::new();
        loop {
            while let Some(f) = take_frame(&mut self.buf, MessageLimits::SERVER).expect("valid frames") {
                let tag = f.tag;
                out.push((tag, f.body()));
                if tag == last {
                    return out;
                }
            }
            let n = tokio::time::timeout(WAIT, self.io.read_buf(&mut self.buf))
                .await
                .unwrap_or_else(|_| panic!("waited for {:?}; got {:?}", last as char, tags(&out)))
                .expect("read");
            assert!(
                n > 0,
                "closed while waiting for {:?}; got {:?}",
                last as char,
                tags(&out)
            );
        }
    }
}

fn tags(frames: &[(u8, Bytes)]) -> String {
    frames.iter().map(|(t, _)| *t as char).collect()
}

fn sql_of(frames: &[(u8, Bytes)]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|(t, b)| match fe::parse(*t, b) {
            Ok(fe::ClientMessage::Query { sql }) | Ok(fe::ClientMessage::Parse { sql, .. }) => {
                Some(String::from_utf8_lossy(sql).into_owned())
            }
            _ => None,
        })
        .collect()
}

struct Harness {
    client: Peer,
    server: Peer,
    stop: watch::Sender<Stop>,
    task: JoinHandle<(Result<SessionEnd, SessionError>, Counts)>,
    mirror: std::sync::Arc<Mirror>,
}

fn start(idle_timeout: Option<Duration>) -> Harness {
    start_grouped(idle_timeout, &[]).0
}

/// What a session that ended with [`SessionEnd::Reroute`] took along.
type Taken = std::sync::Arc<std::sync::Mutex<Option<super::Resume>>>;

/// A session whose engine sees `foreign` as tables of another group, written on the other store.
fn start_grouped(idle_timeout: Option<Duration>, foreign: &[&str]) -> (Harness, Taken) {
    let mirror = Mirror::for_tests_grouped(&[TABLE], foreign);
    let taken: Taken = Taken::default();
    let keep = std::sync::Arc::clone(&taken);
    let (client_side, client) = tokio::io::duplex(1 << 16);
    let (server_side, server) = tokio::io::duplex(1 << 16);
    let (stop, stop_rx) = watch::channel(Stop::Run);
    let engine = std::sync::Arc::clone(&mirror);
    let task = tokio::spawn(async move {
        let (mut cr, mut cw) = tokio::io::split(client_side);
        let (mut ur, mut uw) = tokio::io::split(server_side);
        let mut host = TestHost {
            stop: stop_rx,
            counts: Counts::default(),
        };
        let params = SessionParams {
            limits: MessageLimits::default(),
            idle_timeout,
            startup: Vec::new(),
            login: None,
        };
        let mut resume = None;
        let end = relay(
            &engine,
            params,
            (&mut cr, &mut cw),
            BytesMut::new(),
            (&mut ur, &mut uw),
            BytesMut::new(),
            &mut host,
            &mut resume,
        )
        .await;
        *keep.lock().expect("not poisoned") = resume;
        (end, host.counts)
    });
    let h = Harness {
        client: Peer {
            io: client,
            buf: BytesMut::new(),
        },
        server: Peer {
            io: server,
            buf: BytesMut::new(),
        },
        stop,
        task,
        mirror,
    };
    (h, taken)
}

impl Harness {
    async fn end(self) -> (Result<SessionEnd, SessionError>, Counts) {
        self.end_within(WAIT).await
    }

    /// With paused time, waits longer than any timer the test sets.
    async fn end_within(self, limit: Duration) -> (Result<SessionEnd, SessionError>, Counts) {
        tokio::time::timeout(limit, self.task)
            .await
            .expect("the session ended")
            .expect("the session did not panic")
    }
}

/// Server answers, built with pgwire's builders.
#[derive(Default)]
struct Answers(BytesMut);

impl Answers {
    fn empty(mut self, tag: u8) -> Self {
        backend::empty_message(&mut self.0, tag);
        self
    }
    fn done(mut self, command: &str) -> Self {
        backend::command_complete(&mut self.0, command);
        self
    }
    fn ready(mut self, status: TransactionStatus) -> Self {
        backend::ready_for_query(&mut self.0, status);
        self
    }
    fn error(mut self, code: SqlState, message: &str) -> Self {
        ErrorResponse::new(Severity::Error, code, message).encode(&mut self.0);
        self
    }
    /// A capture notice: one row image of `table`.
    fn image(mut self, table: &str, op: &str, json: &str) -> Self {
        ErrorResponse::new(
            Severity::Notice,
            SqlState(*switchyard_store::capture::CAPTURE_SQLSTATE),
            json,
        )
        .with_detail(table)
        .with_hint(op)
        .encode(&mut self.0);
        self
    }
    /// The answers to one statement the session injected (Parse, Bind, Execute, Close, Close).
    fn injected(self, command: &str) -> Self {
        self.empty(b'1').empty(b'2').done(command).empty(b'3').empty(b'3')
    }
}

fn query(sql: &str) -> BytesMut {
    let mut out = BytesMut::new();
    fe::query(&mut out, sql);
    out
}

#[tokio::test]
async fn a_read_passes_through_untouched_and_terminate_ends_the_session() {
    let mut h = start(None);
    h.client.send(&query("SELECT 1")).await;
    let got = h.server.read_until(b'Q').await;
    assert_eq!(sql_of(&got), ["SELECT 1"]);
    let answer = Answers::default().done("SELECT 1").ready(TransactionStatus::Idle);
    h.server.send(&answer.0).await;
    let got = h.client.read_until(b'Z').await;
    assert_eq!(tags(&got), "CZ");

    let mut bye = BytesMut::new();
    fe::terminate(&mut bye);
    h.client.send(&bye).await;
    assert_eq!(tags(&h.server.read_until(b'X').await), "X");
    let (end, counts) = h.end().await;
    assert_eq!(end.unwrap(), SessionEnd::ClientTerminated);
    assert_eq!(counts.client_messages, b"Q");
    assert!(counts.answered >= 1, "the request's latency was recorded");
}

/// An autocommit write runs inside the proxy's transaction: BEGIN, the client's statement, the
/// capture statement (whose image notice the client never sees), the intent, COMMIT; the client
/// hears its CommandComplete and an idle ReadyForQuery once the COMMIT succeeded.
#[tokio::test]
async fn an_autocommit_write_is_wrapped_captured_and_committed_with_its_intent() {
    let mut h = start(None);
    h.client.send(&query("INSERT INTO t VALUES ('1', 'a')")).await;
    let got = h.server.read_until(b'Q').await;
    assert_eq!(sql_of(&got), ["BEGIN"]);
    let got = h.server.read_until(b'Q').await;
    assert_eq!(sql_of(&got), ["INSERT INTO t VALUES ('1', 'a')"]);
    let answer = Answers::default()
        .done("BEGIN")
        .ready(TransactionStatus::InTransaction)
        .done("INSERT 0 1")
        .ready(TransactionStatus::InTransaction);
    h.server.send(&answer.0).await;

    // The capture statement, then a Flush: the session waits for its answers.
    let got = h.server.read_until(b'H').await;
    assert_eq!(tags(&got), "PBECCH");
    assert!(sql_of(&got)[0].starts_with(switchyard_store::capture::CAPTURE_STATEMENT));
    let answer = Answers::default()
        .empty(b'1')
        .empty(b'2')
        .image(TABLE, "u", r#"{"id":"1","v":"a"}"#)
        .done("SET CONSTRAINTS")
        .empty(b'3')
        .empty(b'3');
    h.server.send(&answer.0).await;

    // The follower is down: the intent is recorded with the transaction, then COMMIT.
    let got = h.server.read_until(b'Q').await;
    let intent = sql_of(&got);
    assert!(intent[0].contains("switchyard_intents"), "{intent:?}");
    let got = h.server.read_until(b'Q').await;
    assert_eq!(sql_of(&got), ["COMMIT"]);
    let answer = Answers::default()
        .done("INSERT 0 1")
        .ready(TransactionStatus::InTransaction)
        .done("COMMIT")
        .ready(TransactionStatus::Idle);
    h.server.send(&answer.0).await;

    let got = h.client.read_until(b'Z').await;
    assert_eq!(tags(&got), "CZ", "only the client's own answers");
    assert_eq!(backend::command_tag(&got[0].1), b"INSERT 0 1");
    assert_eq!(got[1].1.as_ref(), b"I");
    // The failed follower leaves the transaction to the repair loop, by its intent.
    assert_eq!(h.mirror.failed.lock().unwrap().len(), 1);
    assert_eq!(
        h.mirror
            .stats
            .mirror_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(h.client);
    let (end, _) = tokio::time::timeout(WAIT, h.task).await.unwrap().unwrap();
    assert_eq!(end.unwrap(), SessionEnd::ClientClosed);
}

/// A write that fails is rolled back by the proxy: no capture, no intent, no COMMIT, and the
/// client sees the error and an idle ReadyForQuery, as from PostgreSQL.
#[tokio::test]
async fn a_failed_autocommit_write_is_rolled_back_and_never_committed() {
    let mut h = start(None);
    h.client.send(&query("INSERT INTO t VALUES ('1', 'a')")).await;
    h.server.read_until(b'Q').await;
    h.server.read_until(b'Q').await;
    let answer = Answers::default()
        .done("BEGIN")
        .ready(TransactionStatus::InTransaction)
        .error(sqlstate::UNIQUE_VIOLATION, "duplicate key")
        .ready(TransactionStatus::Failed);
    h.server.send(&answer.0).await;
    let got = h.server.read_until(b'Q').await;
    assert_eq!(sql_of(&got), ["ROLLBACK"]);
    let answer = Answers::default().done("ROLLBACK").ready(TransactionStatus::Idle);
    h.server.send(&answer.0).await;
    let got = h.client.read_until(b'Z').await;
    assert_eq!(tags(&got), "EZ");
    assert_eq!(got[1].1.as_ref(), b"I");
    drop(h.client);
    let (end, counts) = tokio::time::timeout(WAIT, h.task).await.unwrap().unwrap();
    assert_eq!(end.unwrap(), SessionEnd::ClientClosed);
    assert_eq!(counts.statement_errors, 1);
    assert!(h.mirror.failed.lock().unwrap().is_empty(), "nothing to repair");
}

/// In the extended protocol an error makes the server skip to Sync; the proxy's implicit
/// transaction around the write is then rolled back, and the client gets the server's error and
/// one idle ReadyForQuery.
#[tokio::test]
async fn an_error_in_an_extended_batch_skips_to_sync_and_rolls_back_the_implicit_transaction() {
    let mut h = start(None);
    let mut batch = BytesMut::new();
    fe::parse_statement(&mut batch, b"w", b"INSERT INTO t VALUES ($1, 'a')", &[]);
    fe::bind(&mut batch, b"", b"w", &[], &[Some(b"1")], &[]);
    fe::execute(&mut batch, b"", 0);
    fe::sync(&mut batch);
    h.client.send(&batch).await;
    // The client's Parse, the proxy's BEGIN, the client's Bind and Execute, then a Flush.
    let got = h.server.read_until(b'H').await;
    assert_eq!(tags(&got), "PPBECCBEH");
    assert_eq!(sql_of(&got), ["INSERT INTO t VALUES ($1, 'a')", "BEGIN"]);
    let answer = Answers::default()
        .empty(b'1')
        .injected("BEGIN")
        .empty(b'2')
        .error(sqlstate::UNIQUE_VIOLATION, "duplicate key");
    h.server.send(&answer.0).await;
    // The client's Sync (the server skipped to it), then the proxy's ROLLBACK.
    assert_eq!(tags(&h.server.read_until(b'S').await), "S");
    h.server
        .send(&Answers::default().ready(TransactionStatus::Failed).0)
        .await;
    let got = h.server.read_until(b'Q').await;
    assert_eq!(sql_of(&got), ["ROLLBACK"]);
    h.server
        .send(
            &Answers::default()
                .done("ROLLBACK")
                .ready(TransactionStatus::Idle)
                .0,
        )
        .await;
    let got = h.client.read_until(b'Z').await;
    assert_eq!(
        tags(&got),
        "12EZ",
        "Parse and Bind complete, the error, one ReadyForQuery"
    );
    assert_eq!(got[3].1.as_ref(), b"I");
    drop(h.client);
    let (end, _) = tokio::time::timeout(WAIT, h.task).await.unwrap().unwrap();
    assert_eq!(end.unwrap(), SessionEnd::ClientClosed);
}

/// A write in the client's own transaction is captured at its COMMIT, not before.
#[tokio::test]
async fn a_client_transaction_is_captured_at_its_commit() {
    let mut h = start(None);
    for (sql, answer) in [
        ("BEGIN", Answers::default().done("BEGIN")),
        (
            "INSERT INTO t VALUES ('2', 'b')",
            Answers::default().done("INSERT 0 1"),
        ),
    ] {
        h.client.send(&query(sql)).await;
        assert_eq!(sql_of(&h.server.read_until(b'Q').await), [sql]);
        h.server
            .send(&answer.ready(TransactionStatus::InTransaction).0)
            .await;
        assert_eq!(tags(&h.client.read_until(b'Z').await), "CZ");
    }
    h.client.send(&query("COMMIT")).await;
    let got = h.server.read_until(b'H').await;
    assert_eq!(tags(&got), "PBECCH", "the capture statement comes first");
    let answer = Answers::default()
        .empty(b'1')
        .empty(b'2')
        .image(TABLE, "u", r#"{"id":"2","v":"b"}"#)
        .done("SET CONSTRAINTS")
        .empty(b'3')
        .empty(b'3');
    h.server.send(&answer.0).await;
    let got = h.server.read_until(b'Q').await;
    assert!(sql_of(&got)[0].contains("switchyard_intents"));
    assert_eq!(sql_of(&h.server.read_until(b'Q').await), ["COMMIT"]);
    let answer = Answers::default()
        .done("INSERT 0 1")
        .ready(TransactionStatus::InTransaction)
        .done("COMMIT")
        .ready(TransactionStatus::Idle);
    h.server.send(&answer.0).await;
    let got = h.client.read_until(b'Z').await;
    assert_eq!(tags(&got), "CZ");
    assert_eq!(backend::command_tag(&got[0].1), b"COMMIT");
}

/// PREPARE TRANSACTION after a write to a migrated table cannot be mirrored: the server itself
/// raises the refusal (so the transaction state is what a failed statement leaves).
#[tokio::test]
async fn prepare_transaction_after_a_write_is_refused_by_the_server() {
    let mut h = start(None);
    for (sql, done) in [("BEGIN", "BEGIN"), ("UPDATE t SET v = 'x'", "UPDATE 1")] {
        h.client.send(&query(sql)).await;
        h.server.read_until(b'Q').await;
        h.server
            .send(
                &Answers::default()
                    .done(done)
                    .ready(TransactionStatus::InTransaction)
                    .0,
            )
            .await;
        h.client.read_until(b'Z').await;
    }
    h.client.send(&query("PREPARE TRANSACTION 'x'")).await;
    let sent = sql_of(&h.server.read_until(b'Q').await);
    assert!(
        sent[0].contains("RAISE EXCEPTION") && !sent[0].contains("PREPARE TRANSACTION 'x'"),
        "{sent:?}"
    );
    h.server
        .send(
            &Answers::default()
                .error(sqlstate::FEATURE_NOT_SUPPORTED, "cannot be mirrored")
                .ready(TransactionStatus::Failed)
                .0,
        )
        .await;
    assert_eq!(tags(&h.client.read_until(b'Z').await), "EZ");
}

/// A notification reaches a client that is waiting, not sending.
#[tokio::test]
async fn notifications_reach_an_idle_client() {
    let mut h = start(None);
    let mut n = BytesMut::new();
    // NotificationResponse: pid, channel, payload.
    n.extend_from_slice(&[b'A', 0, 0, 0, 12, 0, 0, 0, 7, b'c', 0, b'p', 0]);
    h.server.send(&n).await;
    let got = h.client.read_until(b'A').await;
    assert_eq!(tags(&got), "A");
}

#[tokio::test]
async fn the_session_ends_when_the_client_or_the_server_goes_away() {
    let h = start(None);
    drop(h.client);
    let (end, _) = tokio::time::timeout(WAIT, h.task).await.unwrap().unwrap();
    assert_eq!(end.unwrap(), SessionEnd::ClientClosed);

    let h = start(None);
    drop(h.server);
    let (end, _) = tokio::time::timeout(WAIT, h.task).await.unwrap().unwrap();
    assert_eq!(end.unwrap(), SessionEnd::UpstreamClosed);
}

#[tokio::test]
async fn an_unknown_message_from_the_client_is_a_protocol_error() {
    let mut h = start(None);
    h.client.send(&[b'z', 0, 0, 0, 4]).await;
    let (end, _) = h.end().await;
    assert!(matches!(end, Err(SessionError::ClientProtocol(_))), "{end:?}");
}

#[tokio::test]
async fn a_drain_ends_an_idle_session_at_once() {
    let h = start(None);
    h.stop
        .send(Stop::Drain {
            grace: Duration::from_secs(60),
        })
        .unwrap();
    let (end, _) = h.end().await;
    assert_eq!(end.unwrap(), SessionEnd::Drained);
}

/// A session inside a transaction is not drained at once: it gets the grace period, then it is
/// cut.
#[tokio::test(start_paused = true)]
async fn a_drain_cuts_an_open_transaction_only_after_the_grace() {
    let mut h = start(None);
    h.client.send(&query("BEGIN")).await;
    h.server.read_until(b'Q').await;
    h.server
        .send(
            &Answers::default()
                .done("BEGIN")
                .ready(TransactionStatus::InTransaction)
                .0,
        )
        .await;
    h.client.read_until(b'Z').await;
    let started = tokio::time::Instant::now();
    h.stop
        .send(Stop::Drain {
            grace: Duration::from_secs(30),
        })
        .unwrap();
    let (end, _) = h.end_within(Duration::from_secs(600)).await;
    assert_eq!(end.unwrap(), SessionEnd::ShutdownNow);
    assert!(
        started.elapsed() >= Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_times_out_but_not_inside_a_transaction() {
    let h = start(Some(Duration::from_secs(10)));
    let started = tokio::time::Instant::now();
    let (end, _) = h.end_within(Duration::from_secs(600)).await;
    assert_eq!(end.unwrap(), SessionEnd::IdleTimeout);
    assert!(started.elapsed() >= Duration::from_secs(10));

    let mut h = start(Some(Duration::from_secs(10)));
    h.client.send(&query("BEGIN")).await;
    h.server.read_until(b'Q').await;
    h.server
        .send(
            &Answers::default()
                .done("BEGIN")
                .ready(TransactionStatus::InTransaction)
                .0,
        )
        .await;
    h.client.read_until(b'Z').await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!h.task.is_finished(), "a session in a transaction is not idle");
    h.stop.send(Stop::Now).unwrap();
    let (end, _) = h.end().await;
    assert_eq!(end.unwrap(), SessionEnd::ShutdownNow);
}

/// COPY FROM STDIN: after CopyInResponse the client's data goes through untouched until
/// CopyDone, then the answers.
#[tokio::test]
async fn copy_data_is_relayed_until_copy_done() {
    let mut h = start(None);
    h.client.send(&query("COPY other FROM STDIN")).await;
    assert_eq!(
        sql_of(&h.server.read_until(b'Q').await),
        ["COPY other FROM STDIN"]
    );
    // CopyInResponse: text format, no columns.
    h.server.send(&[b'G', 0, 0, 0, 7, 0, 0, 0]).await;
    assert_eq!(tags(&h.client.read_until(b'G').await), "G");
    let mut data = BytesMut::new();
    fe::copy_data(&mut data, b"1\tone\n");
    fe::copy_data(&mut data, b"2\ttwo\n");
    fe::copy_done(&mut data);
    h.client.send(&data).await;
    let got = h.server.read_until(b'c').await;
    assert_eq!(tags(&got), "ddc");
    assert_eq!(got[0].1.as_ref(), b"1\tone\n");
    h.server
        .send(&Answers::default().done("COPY 2").ready(TransactionStatus::Idle).0)
        .await;
    assert_eq!(tags(&h.client.read_until(b'Z').await), "CZ");
}

// Table groups split between the stores (`route`): `public.o` is the other store's.

/// Sends `batch`, which reaches the server here as `upstream` (ending with a Sync); the server
/// answers with one `answer` message and an idle ReadyForQuery, which reach the client.
async fn runs_here(h: &mut Harness, batch: &[u8], upstream: &str, answer: u8) {
    h.client.send(batch).await;
    assert_eq!(tags(&h.server.read_until(b'S').await), upstream);
    h.server
        .send(&Answers::default().empty(answer).ready(TransactionStatus::Idle).0)
        .await;
    let back = format!("{}Z", answer as char);
    assert_eq!(tags(&h.client.read_until(b'Z').await), back);
}

const OTHER: &str = "public.o";

/// A lone BEGIN is answered by the session and goes upstream only with the transaction's first
/// statement, here when that statement's tables are this store's.
#[tokio::test]
async fn a_lone_begin_is_answered_and_sent_with_the_first_statement() {
    let (mut h, _) = start_grouped(None, &[OTHER]);
    h.client.send(&query("BEGIN")).await;
    let got = h.client.read_until(b'Z').await;
    assert_eq!(tags(&got), "CZ");
    assert_eq!(
        got[1].1.as_ref(),
        b"T",
        "in a transaction, as the client believes"
    );
    h.client.send(&query("SELECT * FROM t")).await;
    let got = h.server.read_until(b'Q').await;
    assert_eq!(sql_of(&got), ["BEGIN"]);
    let got = h.server.read_until(b'Q').await;
    assert_eq!(sql_of(&got), ["SELECT * FROM t"]);
    let answer = Answers::default()
        .done("BEGIN")
        .ready(TransactionStatus::InTransaction)
        .done("SELECT 0")
        .ready(TransactionStatus::InTransaction);
    h.server.send(&answer.0).await;
    let got = h.client.read_until(b'Z').await;
    assert_eq!(tags(&got), "CZ", "the BEGIN's answers are not sent twice");
    h.client.io.shutdown().await.unwrap();
    assert_eq!(h.end().await.0.unwrap(), SessionEnd::ClientClosed);
}

/// A transaction whose first statement names the other store's table moves there before
/// anything of it goes upstream, with the BEGIN it was answered for and the statement.
#[tokio::test]
async fn a_transaction_on_the_other_groups_tables_moves_before_anything_is_sent() {
    let (mut h, taken) = start_grouped(None, &[OTHER]);
    h.client.send(&query("BEGIN")).await;
    assert_eq!(tags(&h.client.read_until(b'Z').await), "CZ");
    h.client.send(&query("UPDATE o SET v = 'x' WHERE id = '1'")).await;
    let (end, _) = h.end().await;
    assert_eq!(end.unwrap(), SessionEnd::Reroute);
    let resume = taken
        .lock()
        .unwrap()
        .take()
        .expect("what the session takes along");
    assert_eq!(resume.to, Some(switchyard_store::Role::New));
    assert_eq!(
        sql_of(&[(b'Q', resume.deferred.clone().unwrap().slice(5..))]),
        ["BEGIN"]
    );
    assert_eq!(
        sql_of(&[(b'Q', Bytes::copy_from_slice(&resume.client_buf[5..]))]),
        ["UPDATE o SET v = 'x' WHERE id = '1'"]
    );
}

/// A driver's batch that opens the transaction itself (BEGIN's Parse, Bind, Execute, then the
/// statement's) moves too; so does a batch behind a statement-free one (a Close and its Sync,
/// which runs here first).
#[tokio::test]
async fn extended_batches_move_by_their_first_statement() {
    let (mut h, _) = start_grouped(None, &[OTHER]);
    let mut batch = BytesMut::new();
    fe::close(&mut batch, fe::Target::Statement, b"old");
    fe::sync(&mut batch);
    fe::parse_statement(&mut batch, b"", b"BEGIN", &[]);
    fe::bind(&mut batch, b"", b"", &[], &[], &[]);
    fe::execute(&mut batch, b"", 0);
    fe::parse_statement(&mut batch, b"s1", b"SELECT v FROM o WHERE id = $1", &[]);
    fe::bind(&mut batch, b"", b"s1", &[], &[], &[]);
    fe::execute(&mut batch, b"", 0);
    fe::sync(&mut batch);
    // The Close and its Sync run here.
    runs_here(&mut h, &batch, "CS", b'3').await;
    let (end, _) = h.end().await;
    assert_eq!(end.unwrap(), SessionEnd::Reroute);
}

/// A statement naming tables of both stores does not move the session: the server itself
/// refuses it (0A000), as it refuses one of the other store's inside a transaction running here.
#[tokio::test]
async fn a_statement_naming_both_groups_is_refused_where_the_session_is() {
    let (mut h, _) = start_grouped(None, &[OTHER]);
    h.client.send(&query("SELECT * FROM t JOIN o USING (id)")).await;
    let got = h.server.read_until(b'Q').await;
    let sql = sql_of(&got);
    assert!(
        sql[0].contains("RAISE EXCEPTION") && sql[0].contains("groups written on different databases"),
        "{sql:?}"
    );
    let answer = Answers::default()
        .error(sqlstate::FEATURE_NOT_SUPPORTED, "refused")
        .ready(TransactionStatus::Idle);
    h.server.send(&answer.0).await;
    assert_eq!(tags(&h.client.read_until(b'Z').await), "EZ");
    h.client.io.shutdown().await.unwrap();
    assert_eq!(h.end().await.0.unwrap(), SessionEnd::ClientClosed);
}

/// A lone BEGIN in the extended protocol (a statement prepared as BEGIN, then its Bind,
/// Execute and Sync, as libpq's `PQsendQueryPrepared` sends it) is answered by the session too,
/// and travels with the session when the transaction's first statement moves it.
#[tokio::test]
async fn a_lone_extended_begin_is_answered_and_travels_with_a_move() {
    let (mut h, taken) = start_grouped(None, &[OTHER]);
    let mut prepare = BytesMut::new();
    fe::parse_statement(&mut prepare, b"b", b"BEGIN", &[]);
    fe::sync(&mut prepare);
    // Preparing it starts nothing.
    runs_here(&mut h, &prepare, "PS", b'1').await;
    let mut begin = BytesMut::new();
    fe::bind(&mut begin, b"", b"b", &[], &[], &[]);
    fe::execute(&mut begin, b"", 0);
    fe::sync(&mut begin);
    h.client.send(&begin).await;
    let got = h.client.read_until(b'Z').await;
    assert_eq!(tags(&got), "2CZ");
    assert_eq!(got[2].1.as_ref(), b"T");
    h.client.send(&query("DELETE FROM o WHERE id = '1'")).await;
    let (end, _) = h.end().await;
    assert_eq!(end.unwrap(), SessionEnd::Reroute);
    let resume = taken
        .lock()
        .unwrap()
        .take()
        .expect("what the session takes along");
    let mut deferred = BytesMut::from(&resume.deferred.clone().unwrap()[..]);
    let mut kept = Vec::new();
    while let Some(f) = take_frame(&mut deferred, MessageLimits::default()).unwrap() {
        kept.push(f.tag);
    }
    assert_eq!(kept, b"BES");
}

/// A write bound from a statement prepared before, right after a deferred BEGIN, runs inside
/// the client's transaction: the session adds no BEGIN or COMMIT of its own around it (which
/// would commit the client's transaction early).
#[tokio::test]
async fn a_prepared_write_after_a_deferred_begin_stays_in_the_clients_transaction() {
    let (mut h, _) = start_grouped(None, &[OTHER]);
    let mut prepare = BytesMut::new();
    fe::parse_statement(&mut prepare, b"b", b"BEGIN", &[]);
    fe::parse_statement(&mut prepare, b"w", b"UPDATE t SET v = 'x' WHERE id = '1'", &[]);
    fe::sync(&mut prepare);
    h.client.send(&prepare).await;
    assert_eq!(tags(&h.server.read_until(b'S').await), "PPS");
    let answer = Answers::default()
        .empty(b'1')
        .empty(b'1')
        .ready(TransactionStatus::Idle);
    h.server.send(&answer.0).await;
    assert_eq!(tags(&h.client.read_until(b'Z').await), "11Z");
    let run = |name: &[u8]| {
        let mut out = BytesMut::new();
        fe::bind(&mut out, b"", name, &[], &[], &[]);
        fe::execute(&mut out, b"", 0);
        fe::sync(&mut out);
        out
    };
    h.client.send(&run(b"b")).await;
    assert_eq!(tags(&h.client.read_until(b'Z').await), "2CZ");
    h.client.send(&run(b"w")).await;
    // BEGIN's Bind, Execute, Sync, then the client's Bind, Execute, Sync: nothing in between.
    let got = h.server.read_until(b'S').await;
    assert_eq!(tags(&got), "BES");
    let got = h.server.read_until(b'S').await;
    assert_eq!(
        tags(&got),
        "BES",
        "no statement of the session's own around the write"
    );
}

/// A parked connection keeps the statements the session still has unchanged; the others are
/// closed, what it lacks is prepared, and the unnamed statement is always prepared again.
#[test]
fn replay_over_a_parked_connection_prepares_only_what_changed() {
    let frame = |name: &str, sql: &str| {
        let mut out = bytes::BytesMut::new();
        fe::parse_statement(&mut out, name.as_bytes(), sql.as_bytes(), &[]);
        out.freeze()
    };
    let parses: std::collections::HashMap<Vec<u8>, Bytes> = [
        ("same", "SELECT 1"),
        ("changed", "SELECT 2"),
        ("new", "SELECT 3"),
        ("", "SELECT 4"),
    ]
    .iter()
    .map(|(n, q)| (n.as_bytes().to_vec(), frame(n, q)))
    .collect();
    let mut r = super::Resume {
        client_buf: BytesMut::new(),
        settings: None,
        parses,
        shift_draw: 0,
        to: None,
        deferred: None,
        routed: false,
        may_hold_state: false,
    };
    let held: std::collections::HashMap<Vec<u8>, Bytes> = [
        ("same", "SELECT 1"),
        ("changed", "SELECT 20"),
        ("gone", "SELECT 5"),
        ("", "SELECT 4"),
    ]
    .iter()
    .map(|(n, q)| (n.as_bytes().to_vec(), frame(n, q)))
    .collect();
    let (prelude, mut close, parses) = r.replay_over(&held);
    assert_eq!(prelude, None);
    close.sort();
    assert_eq!(close, [b"".to_vec(), b"changed".to_vec(), b"gone".to_vec()]);
    let mut prepared: Vec<Bytes> = parses;
    prepared.sort();
    let mut expected = vec![
        frame("changed", "SELECT 2"),
        frame("new", "SELECT 3"),
        frame("", "SELECT 4"),
    ];
    expected.sort();
    assert_eq!(prepared, expected);
}
