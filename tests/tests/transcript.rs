//! Transcripts: the same bytes sent directly to PostgreSQL and through the proxy must produce
//! the same messages, byte for byte, in the simple and extended protocol (rows, command tags,
//! notices, errors with SQLSTATE, COPY, pipelining, portals, binary formats).
//!
//! Each side runs in its own fresh database so both start from the same state. The only values
//! that may differ are the backend's process id and cancel key (BackendKeyData, and the sender
//! pid inside NotificationResponse) and table OIDs in RowDescription; they are masked before
//! comparing.

use switchyard_test_support::wire::{Frontend, Msg, RawConn};
use switchyard_test_support::{DualEnv, DualTable, TestDb, TestProxy};

/// One step: a batch of frontend messages sent in one write.
fn steps() -> Vec<(&'static str, Frontend)> {
    let mut steps = Vec::new();
    let mut add = |name: &'static str, build: &dyn Fn(&mut Frontend)| {
        let mut f = Frontend::new();
        build(&mut f);
        steps.push((name, f));
    };
    add("create and insert, several statements in one Query", &|f| {
        f.query(
            "create table items (id serial primary key, name text not null, price numeric(10,2), \
             data bytea, tags text[], at timestamptz default '2020-01-02 03:04:05+00');\
             insert into items (name, price, data, tags) values ('a', 1.5, '\\x0102', '{x,y}'), \
             ('b', null, null, null), ('ünïcødé ✓', 3, '', '{}') returning id, name;\
             select * from items order by id",
        );
    });
    add("error in the middle of a multi-statement Query", &|f| {
        f.query("select 1; select 1/0; select 2");
    });
    add("empty query", &|f| {
        f.query("");
    });
    add("notices and warnings", &|f| {
        f.query("do $$ begin raise notice 'hello %', 42; raise warning 'careful'; end $$");
    });
    add("transaction block, failure inside, rollback", &|f| {
        f.query("begin; insert into items (name) values ('c'); select count(*) from items")
            .query("select nosuchcolumn from items")
            .query("select 1")
            .query("rollback")
            .query("select count(*) from items");
    });
    add("unique violation with detail", &|f| {
        f.query("insert into items (id, name) values (1, 'dup')");
    });
    add("COPY TO STDOUT", &|f| {
        f.query("copy (select id, name, price, tags from items order by id) to stdout");
    });
    add("COPY FROM STDIN", &|f| {
        f.query("copy items (name, price) from stdin")
            .copy_data(b"d\t2.50\ne\t\\N\n")
            .copy_data(b"f\t7\n")
            .copy_done()
            .query("select name, price from items order by id");
    });
    add("COPY FROM STDIN aborted by the client", &|f| {
        f.query("copy items (name) from stdin")
            .copy_data(b"zzz\n")
            .copy_fail("changed my mind");
    });
    add("COPY FROM STDIN with bad data", &|f| {
        f.query("copy items (name, price) from stdin")
            .copy_data(b"g\tnot-a-number\n")
            .copy_done();
    });
    add("extended: named statement, describe, portal suspended", &|f| {
        f.parse(
            "s1",
            "select id, name, price from items where id > $1 order by id",
            &[23],
        )
        .describe(b'S', "s1")
        .bind("", "s1", &[Some(b"0")], &[], &[])
        .describe(b'P', "")
        .execute("", 2)
        .execute("", 0)
        .sync();
    });
    add("extended: binary results and binary parameters", &|f| {
        f.bind("p1", "s1", &[Some(&1i32.to_be_bytes())], &[1], &[1])
            .execute("p1", 0)
            .close(b'P', "p1")
            .sync();
    });
    add("extended: error discards until Sync, next batch works", &|f| {
        f.parse("", "select 10 / $1::int", &[])
            .bind("", "", &[Some(b"0")], &[], &[])
            .execute("", 0)
            .parse("", "select 'never runs'", &[])
            .bind("", "", &[], &[], &[])
            .execute("", 0)
            .sync()
            .parse("", "select 'after sync'", &[])
            .bind("", "", &[], &[], &[])
            .execute("", 0)
            .sync();
    });
    add("extended: pipelined batches, NULL parameter, RETURNING", &|f| {
        for i in 0..3 {
            let name = format!("pipelined {i}");
            f.parse(
                "",
                "insert into items (name, price) values ($1, $2) returning id, name, price",
                &[],
            )
            .bind("", "", &[Some(name.as_bytes()), None], &[], &[])
            .execute("", 0)
            .sync();
        }
    });
    add("extended: Flush then Sync, close statement", &|f| {
        f.parse("s2", "select count(*) from items", &[])
            .flush()
            .bind("", "s2", &[], &[], &[1])
            .execute("", 0)
            .close(b'S', "s2")
            .close(b'S', "s1")
            .sync();
    });
    add("extended: unknown statement", &|f| {
        f.bind("", "nosuch", &[], &[], &[]).execute("", 0).sync();
    });
    add("LISTEN / NOTIFY", &|f| {
        f.query("listen chan; notify chan, 'payload ✓'")
            .query("unlisten *");
    });
    add("SET, SHOW, RESET of a startup parameter", &|f| {
        f.query("set application_name = 'changed'; show application_name")
            .query("reset application_name; show application_name")
            .query(
                "set datestyle = 'SQL, DMY'; select '2021-02-03'::date; reset all; select '2021-02-03'::date",
            );
    });
    add("large result", &|f| {
        f.query("select g, repeat('x', 1000) from generate_series(1, 3000) g");
    });
    add("large query", &|f| {
        let big = format!("select length('{}')", "y".repeat(2 * 1024 * 1024));
        f.query(&big);
    });
    steps
}

/// Masks what legitimately differs between two backends.
fn normalize(msgs: &[Msg]) -> Vec<(char, Vec<u8>)> {
    msgs.iter()
        .map(|m| {
            let body = match m.tag {
                b'K' => b"<backend key>".to_vec(),
                b'T' => mask_table_oids(&m.body),
                b'A' => {
                    let mut b = m.body.to_vec();
                    b[..4].copy_from_slice(b"<pid");
                    b
                }
                _ => m.body.to_vec(),
            };
            (m.tag as char, body)
        })
        .collect()
}

/// RowDescription names each column's table by OID, which differs between the two databases.
fn mask_table_oids(body: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    let fields = i16::from_be_bytes([b[0], b[1]]);
    let mut pos = 2;
    for _ in 0..fields {
        pos += b[pos..].iter().position(|&c| c == 0).unwrap() + 1;
        b[pos..pos + 4].copy_from_slice(b"<oid");
        pos += 18;
    }
    b
}

async fn run(addr: std::net::SocketAddr, db: &str) -> anyhow::Result<Vec<Vec<Msg>>> {
    let (mut conn, greeting) = RawConn::login(addr, "postgres", db).await?;
    let mut out = vec![greeting];
    for (name, step) in steps() {
        eprintln!("transcript step: {name}");
        conn.send(step.bytes()).await?;
        out.push(conn.read_until_ready(step.requests()).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_match_direct_byte_for_byte() -> anyhow::Result<()> {
    let direct_db = TestDb::create("tr_direct").await?;
    let proxied_db = TestDb::create("tr_proxy").await?;
    let other = TestDb::create("tr_new").await?;
    let proxy = TestProxy::passthrough(proxied_db.url(), other.url()).await?;
    compare_transcripts(&direct_db, &proxy, proxied_db.name()).await
}

/// The same transcript through a proxy in dual-write mode (a migrated table exists, so every
/// session runs the dual-write relay): statements that touch no migrated table must come back
/// exactly as from PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_match_direct_through_the_dual_write_relay() -> anyhow::Result<()> {
    let direct_db = TestDb::create("tr_dw_direct").await?;
    let env = DualEnv::new(
        "tr_dw",
        "create table mirror_probe (id int primary key, v text)",
        vec![DualTable::new("mirror_probe")],
    )
    .await?;
    let proxy = env.proxy().await?;
    compare_transcripts(&direct_db, &proxy, env.old.name()).await
}

async fn compare_transcripts(direct_db: &TestDb, proxy: &TestProxy, proxied_db: &str) -> anyhow::Result<()> {
    let direct = run("127.0.0.1:5432".parse()?, direct_db.name()).await?;
    let proxied = run(proxy.addr, proxied_db).await?;

    let names: Vec<&str> = std::iter::once("startup")
        .chain(steps().iter().map(|(n, _)| *n))
        .collect();
    assert_eq!(direct.len(), proxied.len());
    for ((name, d), p) in names.iter().zip(&direct).zip(&proxied) {
        assert!(!d.is_empty(), "step {name}: no answer from PostgreSQL");
        assert_eq!(
            normalize(d),
            normalize(p),
            "step {name}: proxy answer differs from direct"
        );
    }

    // Guard against a transcript that compares nothing interesting.
    let tags = |i: usize| -> Vec<u8> { direct[i].iter().map(|m| m.tag).collect() };
    assert!(
        tags(0).contains(&b'K') && tags(0).contains(&b'S'),
        "startup has key data and parameters"
    );
    let codes = |i: usize| -> Vec<String> { direct[i].iter().filter_map(Msg::code).collect() };
    assert_eq!(codes(2), vec!["22012"], "division by zero reported");
    assert!(tags(3).contains(&b'I'), "EmptyQueryResponse");
    assert_eq!(codes(4), vec!["00000", "01000"], "notice and warning");
    assert!(
        codes(5).contains(&"42703".to_owned()),
        "undefined column in a transaction"
    );
    assert_eq!(codes(6), vec!["23505"]);
    assert!(
        tags(7).contains(&b'H') && tags(7).contains(&b'd'),
        "COPY OUT data"
    );
    assert!(tags(8).contains(&b'G'), "COPY IN started");
    assert_eq!(codes(9), vec!["57014"], "COPY FROM aborted by client");
    assert_eq!(codes(10), vec!["22P02"], "bad COPY data");
    assert!(tags(11).contains(&b's'), "PortalSuspended");
    assert_eq!(direct[13].iter().filter(|m| m.tag == b'Z').count(), 2);
    assert_eq!(codes(13), vec!["22012"]);
    assert_eq!(codes(16), vec!["26000"], "unknown prepared statement");
    assert!(tags(17).contains(&b'A'), "NotificationResponse");
    let stats: Vec<String> = direct[18]
        .iter()
        .filter(|m| m.tag == b'S')
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert!(
        stats.iter().any(|s| s.contains("switchyard-tests")),
        "RESET restores the startup value reported by the server: {stats:?}"
    );
    assert!(direct[19].iter().filter(|m| m.tag == b'D').count() == 3000);
    Ok(())
}
