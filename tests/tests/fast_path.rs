//! The fast-path function call (FunctionCall, `F`) through the proxy in `dual_write` (issue 11,
//! section 3): a function called by OID that writes a migrated table gets its rows to NEW, and
//! the call and its answer pass through unchanged (the same messages as from OLD directly).
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-FUNCTION-CALL>

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_test_support::wire::{Frontend, Msg, RawConn};
use switchyard_test_support::{DualEnv, DualTable, TestProxy};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, v text);
CREATE FUNCTION put_item(i int, t text) RETURNS int LANGUAGE sql
    AS $$ INSERT INTO items (id, v) VALUES (i, t) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v RETURNING id * 10 $$;
";

const SETTLE: Duration = Duration::from_secs(30);

/// The messages answering `f` on `conn`.
async fn answers(conn: &mut RawConn, f: &Frontend) -> Vec<Msg> {
    conn.send(f.bytes()).await.unwrap();
    conn.read_until_ready(f.requests()).await.unwrap()
}

fn call(oid: u32, id: &str, v: &str) -> Frontend {
    let mut f = Frontend::new();
    f.function_call(oid, &[Some(id.as_bytes()), Some(v.as_bytes())], 0);
    f
}

/// Tags and bodies, errors reduced to their SQLSTATE (their messages name positions and files).
fn shape(msgs: &[Msg]) -> Vec<(char, String)> {
    msgs.iter()
        .map(|m| match m.tag {
            b'E' | b'N' => (m.tag as char, m.code().unwrap_or_default()),
            _ => (m.tag as char, String::from_utf8_lossy(&m.body).into_owned()),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_calls_that_write_reach_new() {
    let env = DualEnv::new("fastpath", SCHEMA, vec![DualTable::new("items")])
        .await
        .unwrap();
    let p = TestProxy::start(&env.proxy_config_with_mirror(env.new.url(), &[("repair_interval_ms", 100)]))
        .await
        .unwrap();
    let oid = env
        .old
        .query_i64("SELECT 'put_item(int, text)'::regprocedure::oid::int8")
        .await
        .unwrap() as u32;
    let proxy_addr: SocketAddr = ([127, 0, 0, 1], p.port()).into();
    let old_addr = switchyard_test_support::server_of(env.old.url());
    let (mut via_proxy, _) = RawConn::login(proxy_addr, "postgres", env.old.name())
        .await
        .unwrap();
    let (mut direct, _) = RawConn::login(old_addr, "postgres", env.old.name())
        .await
        .unwrap();

    // Autocommit: the same answer as OLD gives directly (FunctionCallResponse with the result
    // in text, then ReadyForQuery idle).
    let through = answers(&mut via_proxy, &call(oid, "1", "fast path")).await;
    let plain = answers(&mut direct, &call(oid, "1", "fast path")).await;
    assert_eq!(shape(&through), shape(&plain));
    assert_eq!(
        shape(&through),
        vec![('V', "\0\0\0\u{2}10".to_owned()), ('Z', "I".to_owned())]
    );

    // Inside a transaction, alone and together with a write the proxy mirrors itself.
    let mut f = Frontend::new();
    f.query("BEGIN");
    f.function_call(oid, &[Some(b"3"), Some(b"in a block")], 1);
    f.query("COMMIT");
    f.query("BEGIN");
    f.query("INSERT INTO items VALUES (4, 'plain insert')");
    f.function_call(oid, &[Some(b"5"), Some(b"beside a mirrored write")], 0);
    f.function_call(oid, &[Some(b"4"), Some(b"over the plain insert")], 0);
    f.query("COMMIT");
    let msgs = answers(&mut via_proxy, &f).await;
    assert!(!msgs.iter().any(|m| m.tag == b'E'), "{msgs:?}");
    assert!(
        !msgs.iter().any(|m| m.code().as_deref() == Some("SY001")),
        "capture notices reached the client"
    );
    let binary = msgs.iter().find(|m| m.tag == b'V').unwrap();
    assert_eq!(&binary.body[..], &[0, 0, 0, 4, 0, 0, 0, 30], "binary result");

    // A call that fails (no such function; a failing write) is answered as OLD answers it, and
    // the session goes on.
    let mut bad = Frontend::new();
    bad.function_call(1, &[], 0);
    bad.function_call(oid, &[None, Some(b"NULL key")], 0);
    bad.query("SELECT 1");
    let through = answers(&mut via_proxy, &bad).await;
    let plain = answers(&mut direct, &bad).await;
    assert_eq!(shape(&through), shape(&plain));
    assert!(through.iter().any(|m| m.tag == b'E'));

    env.assert_converged_after_repairs(SETTLE).await.unwrap();
    assert_eq!(env.new.query_i64("SELECT count(*) FROM items").await.unwrap(), 4);
    assert_eq!(
        env.new
            .query_i64("SELECT count(*) FROM items WHERE id = 4 AND v = 'over the plain insert'")
            .await
            .unwrap(),
        1
    );
}
