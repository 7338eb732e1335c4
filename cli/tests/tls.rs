//! TLS toward clients (`[tls]`), with the clients operators use: psql (libpq) in every
//! `sslmode`, and `openssl s_client -starttls postgres` to see the certificate served. The
//! certificates are made with the openssl command for each test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{signal, start_proxy_with, text, Proxy};
use switchyard_test_support::{Certs, TestDb};

fn start(old: &TestDb, new: &TestDb, tls: &str) -> Proxy {
    let sections = format!("[auth]\nmethod = \"trust\"\n[telemetry]\nlog_level = \"warn\"\n{tls}");
    start_proxy_with(old, new, "", &sections, Stdio::null())
}

fn tls_section(mode: &str, certs: &Certs, extra: &str) -> String {
    format!(
        "[tls]\nmode = \"{mode}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n{extra}",
        certs.path("server.pem").display(),
        certs.path("server.key").display()
    )
}

/// psql through the proxy with `conn` added to the connection string, running `command`.
fn psql(proxy: &Proxy, db: &TestDb, conn: &str, command: &str) -> Output {
    Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname={} connect_timeout=5 {conn}",
            proxy.port,
            db.name()
        ))
        .args(["-X", "-A", "-t", "-c", command])
        .env_remove("PGSSLMODE")
        .output()
        .unwrap()
}

/// The subject of the certificate the proxy serves, as `openssl s_client` sees it.
fn served_subject(port: u16) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-starttls",
            "postgres",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    shown
        .lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no certificate shown: {shown}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_serves_tls_refuses_plain_text_and_reloads_certificates_on_sighup() {
    let (old, new) = TestDb::create_pair("cli_tls_require").await.unwrap();
    let certs = Certs::new("require");
    certs.ca("ca1");
    certs.server("server", "switchyard-test-1", "ca1");
    let proxy = start(&old, &new, &tls_section("require", &certs, ""));

    let out = psql(&proxy, &old, "sslmode=require", "\\conninfo");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SSL connection"), "{}", text(&out));
    let ca1 = certs.path("ca1.pem");
    let verified = format!("sslmode=verify-full sslrootcert={}", ca1.display());
    let out = psql(&proxy, &old, &verified, "SELECT current_database()");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), old.name());

    // Plain text is refused as a hostssl-only server refuses it.
    let out = psql(&proxy, &old, "sslmode=disable", "SELECT 1");
    assert!(!out.status.success());
    let expected = format!(
        "no pg_hba.conf entry for host \"127.0.0.1\", user \"postgres\", database \"{}\", no encryption",
        old.name()
    );
    assert!(text(&out).contains(&expected), "{}", text(&out));

    // A session open across the reload keeps going.
    let long = {
        let port = proxy.port;
        let db = old.name().to_owned();
        let conn = verified.clone();
        std::thread::spawn(move || {
            Command::new("psql")
                .arg(format!(
                    "host=127.0.0.1 port={port} user=postgres dbname={db} {conn}"
                ))
                .args([
                    "-X",
                    "-A",
                    "-t",
                    "-c",
                    "SELECT pg_sleep(2)",
                    "-c",
                    "SELECT 'still here'",
                ])
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(served_subject(proxy.port).contains("switchyard-test-1"));
    // A renewed certificate, from another CA, written over the same files.
    certs.ca("ca2");
    certs.server("server", "switchyard-test-2", "ca2");
    signal(&proxy.child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !served_subject(proxy.port).contains("switchyard-test-2") {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ca2 = certs.path("ca2.pem");
    let out = psql(
        &proxy,
        &old,
        &format!("sslmode=verify-full sslrootcert={}", ca2.display()),
        "SELECT 1",
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = psql(&proxy, &old, &verified, "SELECT 1");
    assert!(
        !out.status.success(),
        "the old CA no longer verifies: {}",
        text(&out)
    );
    let out = long.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("still here"), "{}", text(&out));
}

/// After the TLS handshake a GSSENCRequest is refused as PostgreSQL refuses it there (it takes
/// one only after an SSLRequest it answered N): FATAL, unsupported frontend protocol 1234.5680.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gss_encryption_request_inside_tls_is_refused_as_the_server_refuses_it() {
    let (old, new) = TestDb::create_pair("cli_tls_gss").await.unwrap();
    let certs = Certs::new("gss");
    certs.ca("ca1");
    certs.server("server", "switchyard-test-1", "ca1");
    let proxy = start(&old, &new, &tls_section("allow", &certs, ""));
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{}", proxy.port))
        .args(["-starttls", "postgres"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.starts_with('E'), "expected an ErrorResponse, got {shown:?}");
    assert!(
        shown.contains("unsupported frontend protocol 1234.5680"),
        "{shown:?}"
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_serves_both_and_a_client_ca_requires_client_certificates() {
    let (old, new) = TestDb::create_pair("cli_tls_allow").await.unwrap();
    let certs = Certs::new("allow");
    certs.ca("ca");
    certs.server("server", "switchyard-test", "ca");
    certs.ca("clients");
    certs.leaf("alice", "alice", "clients", "extendedKeyUsage=clientAuth\n");
    let extra = format!("client_ca_file = \"{}\"\n", certs.path("clients.pem").display());
    let proxy = start(&old, &new, &tls_section("allow", &certs, &extra));

    let out = psql(&proxy, &old, "sslmode=disable", "SELECT 'plain'");
    assert!(out.status.success(), "{}", text(&out));
    let out = psql(&proxy, &old, "sslmode=require", "SELECT 1");
    assert!(
        !out.status.success(),
        "TLS without a client certificate is refused"
    );
    let with_cert = format!(
        "sslmode=require sslcert={} sslkey={}",
        certs.path("alice.pem").display(),
        certs.path("alice.key").display()
    );
    // libpq refuses a key file others can read.
    set_private(&certs.path("alice.key"));
    let out = psql(&proxy, &old, &with_cert, "\\conninfo");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SSL connection"), "{}", text(&out));
}

fn set_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Through the dual-write relay too: a write over TLS is mirrored, and a 20 MB result arrives
/// whole (a TLS write that left ciphertext buffered would stall it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_write_sessions_over_tls_mirror_and_stream_large_results() {
    use switchyard_test_support::{DualEnv, TestProxy};

    let env = DualEnv::kv("cli_tls_dual").await.unwrap();
    let certs = Certs::new("dual");
    certs.ca("ca");
    certs.server("server", "switchyard-test", "ca");
    let mut cfg = env.proxy_config();
    cfg.extra_sections.push(tls_section("require", &certs, ""));
    let proxy = env.start_proxy(&cfg).await.unwrap();
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres dbname={} sslmode=verify-full sslrootcert={}",
        proxy.addr.port(),
        env.old.name(),
        certs.path("ca.pem").display()
    );
    let run = |sql: &str| {
        let out = Command::new("psql")
            .arg(&conn)
            .args(["-X", "-A", "-t", "-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "{sql}: {}", text(&out));
        out.stdout
    };
    run("INSERT INTO kv VALUES (1, 'over tls')");
    let big = run("SELECT repeat('x', 1000) FROM generate_series(1, 20000)");
    assert_eq!(big.len(), 20000 * 1001, "every row arrived");
    assert_eq!(
        env.new
            .query_i64("SELECT count(*) FROM kv WHERE v = 'over tls'")
            .await
            .unwrap(),
        1,
        "the write was mirrored"
    );
    drop::<TestProxy>(proxy);
}

/// Over TLS, SCRAM-SHA-256-PLUS is offered and binds the exchange to the proxy's certificate:
/// libpq with `channel_binding=require` logs in; in plain text it cannot (nothing to bind to),
/// and a wrong password still fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_channel_binding_over_tls() {
    let (old, new) = TestDb::create_pair("cli_tls_plus").await.unwrap();
    let certs = Certs::new("plus");
    certs.ca("ca");
    certs.server("server", "switchyard-test", "ca");
    let users = certs.path("users.toml");
    std::fs::write(
        &users,
        "[[users]]\nname = \"postgres\"\npassword = \"right-one\"\n",
    )
    .unwrap();
    let sections = format!(
        "[auth]\nmethod = \"scram-sha-256\"\nusers_file = \"{}\"\n[telemetry]\nlog_level = \"warn\"\n{}",
        users.display(),
        tls_section("allow", &certs, "")
    );
    let proxy = start_proxy_with(&old, &new, "", &sections, Stdio::null());
    let login = |conn: &str, password: &str| {
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname={} connect_timeout=5 {conn}",
                proxy.port,
                old.name()
            ))
            .args(["-X", "-A", "-t", "-c", "SELECT 'in'"])
            .env("PGPASSWORD", password)
            .env_remove("PGSSLMODE")
            .output()
            .unwrap()
    };
    let out = login("sslmode=require channel_binding=require", "right-one");
    assert!(out.status.success(), "{}", text(&out));
    let out = login("sslmode=disable channel_binding=require", "right-one");
    assert!(!out.status.success(), "no channel to bind to in plain text");
    assert!(text(&out).contains("channel binding"), "{}", text(&out));
    let out = login("sslmode=require channel_binding=require", "wrong-one");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("password authentication failed"),
        "{}",
        text(&out)
    );
    // A client that does not bind still logs in over TLS and in plain text.
    for conn in ["sslmode=require channel_binding=disable", "sslmode=disable"] {
        let out = login(conn, "right-one");
        assert!(out.status.success(), "{conn}: {}", text(&out));
    }
}
