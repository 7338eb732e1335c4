//! Tests of the harness itself, against the local PostgreSQL server and
//! throwaway clusters.

// Helpers outside `#[test]` functions are not covered by clippy.toml's
// allow-*-in-tests; a failing helper should fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use switchyard_test_support::{init_tracing, pg_url, ClusterOptions, TestCluster, TestDb};

async fn database_exists(name: &str) -> bool {
    let (admin, connection) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(connection);
    admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("pg_database query")
        .is_some()
}

async fn select_one(client: &tokio_postgres::Client) -> i32 {
    client.query_one("SELECT 1", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn test_db_is_created_usable_and_dropped() {
    init_tracing();
    let db = TestDb::create("Harness-Create").await.unwrap();
    let name = db.name().to_owned();
    assert!(name.starts_with("sy_harness_create_"), "{name}");
    assert!(name.len() <= 63);
    assert!(db.url().ends_with(&format!("/{name}")));

    db.execute_batch("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2);")
        .await
        .unwrap();
    let client = db.client().await.unwrap();
    let count: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
    let current: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, name);

    // The open client must not stop the drop (WITH (FORCE)).
    drop(db);
    assert!(!database_exists(&name).await);
    assert!(client.is_closed() || client.simple_query("SELECT 1").await.is_err());
}

#[test]
fn test_db_drops_outside_a_runtime() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::create("no_runtime")).unwrap();
    let name = db.name().to_owned();
    drop(db);
    assert!(!runtime.block_on(database_exists(&name)));
}

#[tokio::test]
async fn create_pair_gives_two_databases() {
    let (old, new) = TestDb::create_pair("pair").await.unwrap();
    assert_ne!(old.name(), new.name());
    assert!(old.name().starts_with("sy_pair_old_"));
    assert!(new.name().starts_with("sy_pair_new_"));
    let names = [old.name().to_owned(), new.name().to_owned()];
    drop((old, new));
    for name in names {
        assert!(!database_exists(&name).await);
    }
}

#[tokio::test]
async fn cluster_stops_starts_and_survives_a_crash() {
    init_tracing();
    let mut cluster = TestCluster::start(ClusterOptions::default().setting("work_mem", "8MB"))
        .await
        .unwrap();
    let port = cluster.port();
    let dir = cluster.data_dir().to_owned();

    let client = cluster.client("postgres").await.unwrap();
    let prepared: String = client
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(prepared, "10");
    let work_mem: String = client.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(work_mem, "8MB");
    client
        .batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before')")
        .await
        .unwrap();

    cluster.stop().await.unwrap();
    assert!(cluster.client("postgres").await.is_err());
    cluster.start_again().await.unwrap();
    assert_eq!(cluster.port(), port);
    let client = cluster.client("postgres").await.unwrap();
    assert_eq!(select_one(&client).await, 1);

    // A crash drops open connections; recovery keeps committed data.
    cluster.kill().await.unwrap();
    assert!(client.simple_query("SELECT 1").await.is_err());
    assert!(cluster.client("postgres").await.is_err());
    cluster.start_again().await.unwrap();
    let client = cluster.client("postgres").await.unwrap();
    let kept: String = client.query_one("SELECT v FROM kept", &[]).await.unwrap().get(0);
    assert_eq!(kept, "before");

    cluster.restart().await.unwrap();
    assert_eq!(select_one(&cluster.client("postgres").await.unwrap()).await, 1);

    drop(cluster);
    assert!(!dir.exists(), "cluster directory left behind");
}

#[tokio::test]
async fn cluster_hosts_test_databases() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let db = TestDb::create_at(&cluster.url("postgres"), "on_cluster")
        .await
        .unwrap();
    assert!(db.url().contains(&format!(":{}/", cluster.port())));
    assert_eq!(select_one(&db.client().await.unwrap()).await, 1);
    // Drop order matters: the database before its cluster.
    drop(db);
}

async fn password_login(
    cluster: &TestCluster,
    user: &str,
    password: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(cluster.port())
        .user(user)
        .dbname("postgres");
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.map(drop)
}

#[tokio::test]
async fn password_auth_md5_and_scram() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    for (method, user) in [("md5", "md5_user"), ("scram-sha-256", "scram_user")] {
        cluster
            .set_password_auth(method, user, "s3cret 'quoted'")
            .await
            .unwrap();
        password_login(&cluster, user, Some("s3cret 'quoted'"))
            .await
            .unwrap_or_else(|e| panic!("{method} login: {e}"));
        assert!(password_login(&cluster, user, None).await.is_err());
        assert!(password_login(&cluster, user, Some("wrong")).await.is_err());
    }
    // The verifier matches the method, so md5 really runs md5.
    let client = cluster.client("postgres").await.unwrap();
    let md5: String = client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'md5_user'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(md5.starts_with("md5"), "{md5}");
    // Earlier users keep their method; postgres keeps trust.
    password_login(&cluster, "md5_user", Some("s3cret 'quoted'"))
        .await
        .unwrap();
    password_login(&cluster, "postgres", None).await.unwrap();
    assert!(cluster.set_password_auth("ldap", "x", "y").await.is_err());
}

#[tokio::test]
async fn sweep_drops_databases_of_dead_processes() {
    // pid 4_000_000_000 exceeds Linux's pid_max, so its owner is surely gone.
    let stale = "sy_harness_sweep_4000000000_0_deadbeef";
    let (admin, connection) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("CREATE DATABASE {stale}"))
        .await
        .unwrap();
    let live = TestDb::create("harness_sweep").await.unwrap();

    let dropped = switchyard_test_support::sweep_stale("harness_sweep")
        .await
        .unwrap();
    assert_eq!(dropped, vec![stale.to_owned()]);
    assert!(!database_exists(stale).await);
    assert!(database_exists(live.name()).await);
}
