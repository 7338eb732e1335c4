//! TLS toward the stores (`sslmode`, `sslrootcert` in `old.url` / `new.url`), against real
//! servers: a throwaway cluster with `ssl = on`, a certificate for `localhost` signed by a CA the
//! test makes, and `hostssl`-only rules for the role Switchyard logs in as (so every connection
//! that works is encrypted); a cluster without TLS; and the shared server (Debian's self-signed
//! snakeoil certificate). Every kind of connection is covered: the sessions' upstream login,
//! the mirror's link, the sqlx pools (repairs, bookkeeping, backfill, drift checker).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use switchyard_backfill::BackfillOptions;
use switchyard_config::StoreUrl;
use switchyard_store::wire::{LoginOutcome, WireTarget};
use switchyard_store::{PgStore, Role};
use switchyard_test_support::{
    Certs, ClusterOptions, DualEnv, DualTable, ProxyConfig, TestCluster, TestDb, TestProxy,
};

/// Bounds every login, backfill and verify.
const LIMIT: Duration = Duration::from_secs(60);
/// The role the stores' URLs name on the TLS cluster: refused unless encrypted.
const TLS_USER: &str = "sy_tls";
/// The role that logs in with a client certificate (`cert` authentication) on the TLS cluster.
const CERT_USER: &str = "sy_cert";
/// Debian's self-signed certificate, served by the shared server.
const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// A cluster serving TLS with `certs`' `server` certificate (for `localhost` only, signed by
/// CA `ca`), where `sy_tls` may only log in over TLS, and `sy_cert` only with a client
/// certificate signed by CA `clients` (`certs`' `sy_cert.pem` / `sy_cert.key`).
async fn tls_cluster(certs: &Certs) -> TestCluster {
    certs.ca("ca");
    certs.ca("other");
    certs.server_for_localhost("server", "ca");
    certs.ca("clients");
    certs.leaf(CERT_USER, CERT_USER, "clients", "extendedKeyUsage=clientAuth\n");
    let options = ClusterOptions::default()
        .hba_first(format!("hostssl all {CERT_USER} 127.0.0.1/32 cert"))
        .hba_first(format!("host all {CERT_USER} 127.0.0.1/32 reject"))
        .hba_first(format!("hostnossl all {TLS_USER} 127.0.0.1/32 reject"))
        .hba_first(format!("hostssl all {TLS_USER} 127.0.0.1/32 trust"));
    let cluster = TestCluster::start(options).await.unwrap();
    cluster
        .enable_tls(
            &certs.path("server.pem"),
            &certs.path("server.key"),
            &certs.path("clients.pem"),
        )
        .await
        .unwrap();
    let admin = cluster.client("postgres").await.unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {TLS_USER} LOGIN SUPERUSER; CREATE ROLE {CERT_USER} LOGIN"
        ))
        .await
        .unwrap();
    cluster
}

fn url(user: &str, host: &str, port: u16, db: &str, query: &str) -> String {
    format!("postgres://{user}@{host}:{port}/{db}?{query}")
}

/// Logs in at the wire level as the proxy's sessions and the mirror do: whether the connection
/// is encrypted, or the error.
async fn wire(url: &str) -> Result<bool, String> {
    let target = WireTarget {
        url: StoreUrl::parse(url).unwrap(),
        store: Role::New,
    };
    match target.connect(196_608, &[], LIMIT, None).await {
        Ok(LoginOutcome::Ready(u)) => Ok(u.stream.is_tls()),
        Ok(LoginOutcome::Refused(r)) => Err(r.message),
        Err(e) => Err(e.to_string()),
    }
}

/// Connects a sqlx pool as the mirror's bookkeeping, the backfill and the drift checker do:
/// whether the server sees the session encrypted, or the error.
async fn pool(url: &str) -> Result<bool, String> {
    let store = PgStore::connect_lazy(Role::New, &StoreUrl::parse(url).unwrap());
    let ssl = tokio::time::timeout(
        LIMIT,
        sqlx::query_scalar::<_, bool>("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(store.pool()),
    )
    .await
    .expect("within the limit");
    store.pool().close().await;
    ssl.map_err(|e| e.to_string())
}

/// Both kinds of connection give the same result; an error must mention every one of `words`.
async fn both(url: &str, expected: Result<bool, &[&str]>) {
    for (kind, got) in [("wire", wire(url).await), ("pool", pool(url).await)] {
        match (&expected, got) {
            (Ok(tls), Ok(got)) => assert_eq!(*tls, got, "{kind} {url}: encrypted?"),
            (Err(words), Err(e)) => {
                for w in *words {
                    assert!(e.contains(w), "{kind} {url}: {e:?} should mention {w:?}");
                }
            }
            (expected, got) => panic!("{kind} {url}: expected {expected:?}, got {got:?}"),
        }
    }
}

/// Through a proxy: whether the session upstream is encrypted, and as whom.
async fn session_ssl(proxy: &TestProxy) -> (bool, String) {
    let client = proxy.client().await.unwrap();
    let row = client
        .query_one(
            "SELECT s.ssl, current_user::text FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The sessions (passthrough, and a table in dual_write whose writes are mirrored), the
/// mirror's link, repairs' and bookkeeping's pools, the backfill and the drift checker all
/// work through a server that refuses Switchyard's role in plain text; OLD's chain is verified
/// (`verify-ca` to 127.0.0.1), NEW's name too (`verify-full` to localhost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_mirror_backfill_and_drift_through_a_hostssl_only_server() {
    let certs = Certs::new("store-e2e");
    let cluster = tls_cluster(&certs).await;
    let admin = cluster.url("postgres");
    let old = TestDb::create_at(&admin, "stls_old").await.unwrap();
    let new = TestDb::create_at(&admin, "stls_new").await.unwrap();
    let schema = "CREATE TABLE kv (id bigint PRIMARY KEY, v text NOT NULL)";
    for db in [&old, &new] {
        db.execute_batch(schema).await.unwrap();
    }
    old.execute_batch("INSERT INTO kv SELECT i, 'v' || i FROM generate_series(1, 500) i")
        .await
        .unwrap();
    let env = DualEnv::from_dbs(old, new, vec![DualTable::new("kv")])
        .await
        .unwrap();

    let ca = certs.path("ca.pem").display().to_string();
    let port = cluster.port();
    let old_url = url(
        TLS_USER,
        "127.0.0.1",
        port,
        env.old.name(),
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    let new_url = url(
        TLS_USER,
        "localhost",
        port,
        env.new.name(),
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    // Sessions log in as the URL's user too, so all of Switchyard's logins are that role's.
    let mut config = env.proxy_config_via(&new_url).with_service_login();
    config.old_url = old_url;
    let proxy = env.start_proxy(&config).await.unwrap();

    assert_eq!(session_ssl(&proxy).await, (true, TLS_USER.to_owned()));
    let client = proxy.client().await.unwrap();
    client
        .batch_execute("INSERT INTO kv VALUES (1001, 'mirrored over TLS')")
        .await
        .unwrap();
    let on_new = env
        .new
        .query_i64("SELECT count(*) FROM kv WHERE id = 1001 AND v = 'mirrored over TLS'")
        .await
        .unwrap();
    assert_eq!(on_new, 1, "the write reached NEW through the mirror's TLS link");
    let row = env
        .new
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
               FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
              WHERE a.application_name = 'switchyard-mirror' AND a.datname = $1",
            &[&env.new.name()],
        )
        .await
        .unwrap();
    let (encrypted, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        encrypted >= 1 && plain == 0,
        "mirror links: {encrypted} in TLS, {plain} plain"
    );

    // The backfill copies OLD's 500 earlier rows over its TLS pools.
    let (_trigger, stop) = switchyard_backfill::stop_channel();
    let options = BackfillOptions {
        workers: 2,
        chunk_rows: 100,
        ..BackfillOptions::default()
    };
    tokio::time::timeout(LIMIT, switchyard_backfill::run(&proxy.config, &options, stop))
        .await
        .expect("backfill within the limit")
        .unwrap();
    assert_eq!(env.new.query_i64("SELECT count(*) FROM kv").await.unwrap(), 501);

    // The drift checker reads both stores over TLS and finds them equal.
    let old_store = switchyard_drift::connect(Role::Old, &proxy.config.old.url).unwrap();
    let new_store = switchyard_drift::connect(Role::New, &proxy.config.new.url).unwrap();
    let settings = proxy.config.tables[0].clone();
    let table = switchyard_drift::DriftTable::load(&old_store, &new_store, &settings)
        .await
        .unwrap();
    let options = switchyard_drift::VerifyOptions {
        chunk_rows: 100,
        resume: false,
        ..Default::default()
    };
    let report = tokio::time::timeout(
        LIMIT,
        switchyard_drift::verify(&old_store, &new_store, &table, &options, "test"),
    )
    .await
    .expect("verify within the limit")
    .unwrap();
    assert_eq!((report.rows_old, report.rows_new), (501, 501));
    assert!(report.differing_keys.is_empty(), "{:?}", report.differing_keys);
    drop(client);
    proxy.stop().await.unwrap();
}

/// Every sslmode against a server with TLS and `hostssl`-only rules, and against one without
/// TLS, for the wire-level login and the sqlx pools alike, with libpq's outcome: which ones
/// connect, encrypted or not, and the cause when they do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_and_its_failures() {
    let certs = Certs::new("store-modes");
    let cluster = tls_cluster(&certs).await;
    let port = cluster.port();
    let ca = certs.path("ca.pem").display().to_string();
    let other = certs.path("other.pem").display().to_string();
    let at = |host: &str, query: &str| url(TLS_USER, host, port, "postgres", query);

    both(&at("127.0.0.1", "sslmode=require"), Ok(true)).await;
    both(&at("127.0.0.1", "sslmode=prefer"), Ok(true)).await;
    both(&at("127.0.0.1", ""), Ok(true)).await;
    // allow: plain text first, refused by the hostssl-only rules, then TLS.
    both(&at("127.0.0.1", "sslmode=allow"), Ok(true)).await;
    both(
        &at("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")),
        Ok(true),
    )
    .await;
    both(
        &at("localhost", &format!("sslmode=verify-full&sslrootcert={ca}")),
        Ok(true),
    )
    .await;
    // require with a root certificate verifies the chain, as in libpq.
    both(
        &at("127.0.0.1", &format!("sslmode=require&sslrootcert={other}")),
        Err(&["invalid peer certificate", "UnknownIssuer"]),
    )
    .await;
    both(&at("127.0.0.1", "sslmode=disable"), Err(&["no encryption"])).await;
    both(
        &at("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")),
        Err(&["invalid peer certificate", "not valid for name", "127.0.0.1"]),
    )
    .await;
    both(
        &at("localhost", &format!("sslmode=verify-ca&sslrootcert={other}")),
        Err(&["invalid peer certificate", "UnknownIssuer"]),
    )
    .await;
    // A client certificate (sslcert/sslkey), for a server that asks for one.
    let (cert, key) = (certs.path("sy_cert.pem"), certs.path("sy_cert.key"));
    let cert_url = |query: &str| url(CERT_USER, "127.0.0.1", port, "postgres", query);
    both(
        &cert_url(&format!(
            "sslmode=require&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        )),
        Ok(true),
    )
    .await;
    both(&cert_url("sslmode=require"), Err(&["certificate"])).await;

    // The wire login's errors name the store and the URL.
    let e = wire(&at("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")))
        .await
        .unwrap_err();
    assert!(
        e.contains("TLS with the NEW store at postgres://sy_tls@127.0.0.1"),
        "{e}"
    );

    // A server without TLS: prefer and allow connect in plain text, require and up fail.
    let plain = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let at = |query: &str| url("postgres", "127.0.0.1", plain.port(), "postgres", query);
    both(&at(""), Ok(false)).await;
    both(&at("sslmode=prefer"), Ok(false)).await;
    both(&at("sslmode=allow"), Ok(false)).await;
    both(&at("sslmode=disable"), Ok(false)).await;
    both(&at("sslmode=require"), Err(&["does not support TLS"])).await;
    both(
        &at(&format!("sslmode=verify-full&sslrootcert={ca}")),
        Err(&["does not support TLS"]),
    )
    .await;
}

/// The shared server with Debian's self-signed certificate: verify-ca with it as the root
/// connects; verify-full to 127.0.0.1 fails (the certificate names the host, not the address).
/// Through the proxy, a session is encrypted unless sslmode=disable (libpq's default is
/// prefer), and a client whose upstream cannot be verified gets 08001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_server_and_the_proxy_sessions() {
    assert!(
        Path::new(SNAKEOIL).is_file(),
        "{SNAKEOIL} is missing: the shared server serves it"
    );
    let (db, other_db) = TestDb::create_pair("stls_shared").await.unwrap();
    let plain_url = db.url().to_owned();
    let new_url = other_db.url().to_owned();
    let with = |query: &str| format!("{plain_url}?{query}");
    both(
        &with(&format!("sslmode=verify-ca&sslrootcert={SNAKEOIL}")),
        Ok(true),
    )
    .await;
    both(
        &with(&format!("sslmode=verify-full&sslrootcert={SNAKEOIL}")),
        Err(&["not valid for name", "127.0.0.1"]),
    )
    .await;

    for (query, tls) in [
        ("sslmode=require", true),
        ("sslmode=prefer", true),
        ("sslmode=disable", false),
        ("application_name=no_sslmode", true),
    ] {
        let config = ProxyConfig::passthrough(&with(query), &new_url);
        let proxy = TestProxy::start(&config).await.unwrap();
        assert_eq!(session_ssl(&proxy).await, (tls, "postgres".to_owned()), "{query}");
        proxy.stop().await.unwrap();
    }

    let config = ProxyConfig::passthrough(
        &with(&format!("sslmode=verify-full&sslrootcert={SNAKEOIL}")),
        &new_url,
    );
    let proxy = TestProxy::start(&config).await.unwrap();
    let Err(e) = proxy.client().await else {
        panic!("the upstream's certificate does not name 127.0.0.1: the session must fail")
    };
    let code = e
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.code())
        .map(|c| c.code().to_owned());
    assert_eq!(code.as_deref(), Some("08001"), "{e:#}");
    proxy.stop().await.unwrap();
}
