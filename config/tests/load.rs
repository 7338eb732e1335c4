//! Valid configurations: defaults, every key set, environment overrides,
//! redaction in output, and the shipped example file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{env, no_env, parse, Scratch, MINIMAL};
use switchyard_config::{
    AuthMethod, Config, Engine, LogFormat, Phase, ProxySettings, TableName, TelemetrySettings, UserCredential,
};

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL);
    assert_eq!(c.proxy, ProxySettings::default());
    assert_eq!(c.proxy.listen, "127.0.0.1:6432".parse::<SocketAddr>().unwrap());
    assert_eq!(c.proxy.admin_listen, Some("127.0.0.1:6490".parse().unwrap()));
    assert_eq!(c.proxy.max_connections, 1000);
    assert_eq!(c.proxy.max_message_bytes, 268_435_456);
    assert_eq!(c.proxy.connect_timeout, Duration::from_millis(5000));
    assert_eq!(c.proxy.client_idle_timeout, None);
    assert_eq!(c.proxy.tcp_keepalive, Some(Duration::from_secs(60)));
    assert_eq!(c.proxy.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.telemetry, TelemetrySettings::default());
    assert_eq!(c.telemetry.log_level, "info");
    assert_eq!(c.telemetry.service_name, "switchyard");
    assert_eq!(c.auth.method, AuthMethod::Trust);
    assert!(c.auth.users.users.is_empty());
    assert!(c.tables.is_empty());
    assert_eq!(c.old.url.engine, Engine::Postgres);
    assert_eq!(c.old.url.database, "old_db");
    assert_eq!(c.new.url.database, "new_db");
}

#[test]
fn every_key_set() {
    let c = parse(
        r#"
[proxy]
listen = "0.0.0.0:7000"
admin_listen = "[::1]:7001"
max_connections = 50
max_message_bytes = 1024
connect_timeout_ms = 250
client_idle_timeout_secs = 600
tcp_keepalive_secs = 0
shutdown_grace_secs = 0

[old]
url = "postgresql://app:s%40cret@db1.internal/shop?sslmode=prefer"
[new]
url = "mysql://app@db2.internal/shop"

[auth]
method = "trust"

[telemetry]
log_format = "json"
log_level = "info,switchyard_proxy=debug"
otlp_endpoint = "http://127.0.0.1:4318"
service_name = "switchyard-canary"

[[tables]]
name = "public.accounts"
phase = "read_shift"
read_share = 25
shadow_share = 7

[[tables]]
name = "orders"
phase = "dual_write"
"#,
    );
    assert_eq!(c.proxy.listen, "0.0.0.0:7000".parse::<SocketAddr>().unwrap());
    assert_eq!(c.proxy.admin_listen, Some("[::1]:7001".parse().unwrap()));
    assert_eq!(c.proxy.max_connections, 50);
    assert_eq!(c.proxy.max_message_bytes, 1024);
    assert_eq!(c.proxy.connect_timeout, Duration::from_millis(250));
    assert_eq!(c.proxy.client_idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(c.proxy.tcp_keepalive, None);
    assert_eq!(c.proxy.shutdown_grace, Duration::ZERO);
    assert_eq!(c.old.url.password.as_deref(), Some("s@cret"));
    assert_eq!(c.old.url.port, 5432);
    assert_eq!(c.old.url.param("sslmode"), Some("prefer"));
    assert_eq!(c.new.url.engine, Engine::Mysql);
    assert_eq!(c.new.url.port, 3306);
    assert_eq!(c.telemetry.log_format, LogFormat::Json);
    assert_eq!(c.telemetry.log_level, "info,switchyard_proxy=debug");
    assert_eq!(
        c.telemetry.otlp_endpoint.as_ref().map(|u| u.as_str()),
        Some("http://127.0.0.1:4318/")
    );
    assert_eq!(c.telemetry.service_name, "switchyard-canary");
    assert_eq!(c.tables.len(), 2);
    assert_eq!(c.tables[0].name, TableName::new("public", "accounts"));
    assert_eq!(c.tables[0].phase, Phase::ReadShift);
    assert_eq!(c.tables[0].read_share, 25);
    assert_eq!(c.tables[1].name.to_string(), "public.orders");
    assert_eq!(c.tables[1].phase, Phase::DualWrite);
    assert_eq!(c.tables[1].read_share, 0);
    assert_eq!(c.tables[0].shadow_share, 7);
    assert_eq!(c.tables[1].shadow_share, switchyard_config::DEFAULT_SHADOW_SHARE);
    assert!(c.table(&TableName::new("public", "orders")).is_some());
    assert!(c.table(&TableName::new("public", "nope")).is_none());
}

#[test]
fn admin_listen_off_disables() {
    let c = parse(&format!("{MINIMAL}\n[proxy]\nadmin_listen = \"off\"\n"));
    assert_eq!(c.proxy.admin_listen, None);
}

#[test]
fn environment_overrides_file() {
    let c = Config::from_toml_str(
        MINIMAL,
        env(&[
            ("SWITCHYARD_OLD__URL", "postgres://other@10.0.0.1:6000/elsewhere"),
            ("SWITCHYARD_PROXY__LISTEN", "0.0.0.0:9999"),
            ("SWITCHYARD_PROXY__MAX_CONNECTIONS", "7"),
            ("SWITCHYARD_TELEMETRY__LOG_FORMAT", "json"),
            // Not configuration keys: no `__`, or another prefix.
            ("SWITCHYARD_CONFIG", "/etc/switchyard.toml"),
            ("SWITCHYARD_LOG", "debug"),
            ("PGHOST", "ignored"),
        ]),
    )
    .unwrap();
    assert_eq!(c.old.url.host, "10.0.0.1");
    assert_eq!(c.old.url.port, 6000);
    assert_eq!(c.old.url.user, "other");
    assert_eq!(c.new.url.database, "new_db");
    assert_eq!(c.proxy.listen, "0.0.0.0:9999".parse::<SocketAddr>().unwrap());
    assert_eq!(c.proxy.max_connections, 7);
    assert_eq!(c.telemetry.log_format, LogFormat::Json);
}

#[test]
fn environment_supplies_missing_sections() {
    let c = Config::from_toml_str(
        "",
        env(&[
            ("SWITCHYARD_OLD__URL", "postgres://u@h/a"),
            ("SWITCHYARD_NEW__URL", "postgres://u@h/b"),
            ("SWITCHYARD_AUTH__METHOD", "trust"),
        ]),
    )
    .unwrap();
    assert_eq!(c.old.url.database, "a");
    assert_eq!(c.new.url.database, "b");
    assert_eq!(c.auth.method, AuthMethod::Trust);
}

#[test]
fn users_file_relative_to_base_dir() {
    let scratch = Scratch::new();
    scratch.write("users.toml", "[[users]]\nname = \"app\"\npassword = \"pw\"\n");
    let text = MINIMAL.replace("method = \"trust\"", "users_file = \"users.toml\"");
    let c = Config::from_toml_str_in(&text, no_env(), &scratch.dir).unwrap();
    assert_eq!(c.auth.method, AuthMethod::ScramSha256);
    assert_eq!(
        c.auth.users_file.as_deref(),
        Some(scratch.dir.join("users.toml").as_path())
    );
    let app = c.auth.users.get("app").unwrap();
    assert_eq!(app.credential, UserCredential::Password("pw".into()));
    assert_eq!(c.load_users().unwrap(), c.auth.users);
}

#[test]
fn load_reads_a_file() {
    let scratch = Scratch::new();
    let path = scratch.write("switchyard.toml", MINIMAL);
    let c = Config::load_with_env(&path, no_env()).unwrap();
    assert_eq!(c, parse(MINIMAL));
}

#[test]
fn debug_and_serialize_hide_secrets() {
    let scratch = Scratch::new();
    scratch.write(
        "users.toml",
        "[[users]]\nname = \"app\"\npassword = \"user-pw-123\"\n",
    );
    let text = r#"
[old]
url = "postgres://u:old-pw-123@h/a?password=query-pw-123"
[new]
url = "postgres://u:new-pw-123@h/b"
[auth]
users_file = "users.toml"
"#;
    let c = Config::from_toml_str_in(text, no_env(), &scratch.dir).unwrap();
    let debug = format!("{c:?}");
    let toml_out = toml::to_string(&c).unwrap();
    for shown in [&debug, &toml_out] {
        assert!(!shown.contains("pw-123"), "secret leaked:\n{shown}");
    }
    assert!(
        toml_out.contains("url = \"postgres://u:***@h:5432/a?password=***\""),
        "{toml_out}"
    );
    assert!(toml_out.contains("credential = \"password\""), "{toml_out}");
    assert!(toml_out.contains("connect_timeout_ms = 5000"), "{toml_out}");
    assert!(toml_out.contains("method = \"scram-sha-256\""), "{toml_out}");
    // The connection string for drivers still has the password.
    assert!(c.old.url.expose_connection_string().contains("old-pw-123"));
}

#[test]
fn reload_takes_users_and_log_level_only() {
    let a = parse(&format!(
        "{MINIMAL}\n[[tables]]\nname = \"t\"\nphase = \"passthrough\"\n"
    ));
    let b = parse(&format!(
        "{MINIMAL}\n[[tables]]\nname = \"t\"\nphase = \"read_shift\"\nread_share = 5\n"
    ));
    assert_eq!(a.changes_needing_restart(&b), vec!["tables"]);
    assert!(a.hot_changes(&b).is_empty());
    let c = parse(&format!("{MINIMAL}\n[proxy]\nlisten = \"127.0.0.1:1\"\n"));
    assert_eq!(c.changes_needing_restart(&c), Vec::<&str>::new());
    let d = parse(&format!("{MINIMAL}\n[telemetry]\nlog_level = \"debug\"\n"));
    assert_eq!(c.changes_needing_restart(&d), vec!["proxy"]);
    assert_eq!(c.hot_changes(&d), vec!["telemetry.log_level"]);
    let running = c.with_hot_fields_of(&d);
    assert_eq!(running.telemetry.log_level, "debug");
    assert_eq!(running.proxy, c.proxy);
    assert!(running.hot_changes(&d).is_empty());
}

/// Every default is written once, in the settings' `Default` implementations: a file that sets
/// nothing it need not resolves to exactly those.
#[test]
fn defaults_come_from_the_settings_types() {
    let c = parse(MINIMAL);
    assert_eq!(c.proxy, switchyard_config::ProxySettings::default());
    assert_eq!(c.telemetry, switchyard_config::TelemetrySettings::default());
    assert_eq!(c.mirror, switchyard_config::MirrorSettings::default());
    let t = parse(&format!(
        "{MINIMAL}\n[[tables]]\nname = \"t\"\nphase = \"dual_write\"\n"
    ));
    assert_eq!(
        t.tables[0].on_uncaptured,
        switchyard_config::UncapturedPolicy::default()
    );
}

/// The shipped example loads; its `users_file` is relative to the workspace
/// root, where programs are started from.
#[test]
fn example_config_loads() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = crate_dir.parent().unwrap();
    let c = Config::load_with_env_in(&crate_dir.join("switchyard.example.toml"), no_env(), workspace)
        .unwrap_or_else(|e| panic!("example config invalid:\n{e}"));
    assert_eq!(
        c.old.url.redacted().to_string(),
        "postgres://postgres@127.0.0.1:5432/switchyard_demo_old"
    );
    assert_eq!(c.new.url.database, "switchyard_demo_new");
    assert_eq!(c.auth.method, AuthMethod::ScramSha256);
    assert_eq!(
        c.auth.users_file.as_deref(),
        Some(workspace.join("config/users.toml").as_path())
    );
    assert_eq!(c.auth.users.users.len(), 1);
    assert_eq!(
        c.auth.users.get("app").map(|u| &u.credential),
        Some(&UserCredential::Password("app-secret".into()))
    );
    assert_eq!(c.tables.len(), 1);
    assert_eq!(c.tables[0].name.to_string(), "public.accounts");
    assert_eq!(c.tables[0].phase, Phase::DualWrite);
    assert_eq!(c.proxy, ProxySettings::default());
    assert_eq!(c.telemetry, TelemetrySettings::default());
}

#[test]
fn upstream_login_other_databases_and_auth_lookup() {
    const STORES: &str = "[old]\nurl = \"postgres://u@127.0.0.1:5432/old_db\"\n[new]\nurl = \"postgres://u@127.0.0.1:5432/new_db\"\n";
    use switchyard_config::{OtherDatabases, UpstreamLogin, DEFAULT_AUTH_QUERY};
    let c = parse(MINIMAL);
    assert_eq!(c.auth.upstream_login, UpstreamLogin::Client);
    assert_eq!(c.auth.auth_query, None);
    assert_eq!(c.proxy.other_databases, OtherDatabases::Passthrough);

    let c = parse(&format!(
        "{STORES}[proxy]\nother_databases = \"refuse\"\n[auth]\nmethod = \"trust\"\nupstream_login = \"service\"\n"
    ));
    assert_eq!(c.auth.upstream_login, UpstreamLogin::Service);
    assert_eq!(c.proxy.other_databases, OtherDatabases::Refuse);

    // SCRAM with no users file: every user is looked up on the store, with PgBouncer's query
    // unless another is given.
    let c = parse(&format!(
        "{STORES}[auth]\nmethod = \"scram-sha-256\"\nauth_lookup = \"old\"\n"
    ));
    assert_eq!(c.auth.auth_query.as_deref(), Some(DEFAULT_AUTH_QUERY));
    assert!(c.auth.users.users.is_empty());
    let c = parse(&format!(
        "{STORES}[auth]\nmethod = \"scram-sha-256\"\nauth_lookup = \"old\"\nauth_query = \"SELECT * FROM pgbouncer.get_auth($1)\"\n"
    ));
    assert_eq!(
        c.auth.auth_query.as_deref(),
        Some("SELECT * FROM pgbouncer.get_auth($1)")
    );
}
