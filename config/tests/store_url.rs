//! Store URL parsing, decoding and redaction.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use switchyard_config::{Engine, StoreUrl};

#[test]
fn decodes_parts() {
    let u = StoreUrl::parse(
        "postgres://us%40er:p%3Ass%2Fw@db.example:6000/my%20db?sslmode=require&application_name=a%20b",
    )
    .unwrap();
    assert_eq!(u.engine, Engine::Postgres);
    assert_eq!(u.host, "db.example");
    assert_eq!(u.port, 6000);
    assert_eq!(u.user, "us@er");
    assert_eq!(u.password.as_deref(), Some("p:ss/w"));
    assert_eq!(u.database, "my db");
    assert_eq!(u.param("sslmode"), Some("require"));
    assert_eq!(u.param("application_name"), Some("a b"));
}

#[test]
fn default_ports_and_engines() {
    let cases = [
        ("postgresql://u@h/d", Engine::Postgres, 5432),
        ("mysql://u@h/d", Engine::Mysql, 3306),
        ("mariadb://u@h", Engine::Mysql, 3306),
        ("mongodb://h", Engine::Mongodb, 27017),
        ("mongodb+srv://u:p@cluster.example/app", Engine::Mongodb, 27017),
    ];
    for (s, engine, port) in cases {
        let u = StoreUrl::parse(s).unwrap();
        assert_eq!((u.engine, u.port), (engine, port), "{s}");
    }
}

#[test]
fn ipv6_host() {
    let u = StoreUrl::parse("postgres://u@[::1]:5433/d").unwrap();
    assert_eq!(u.host, "::1");
    assert_eq!(u.redacted().to_string(), "postgres://u@[::1]:5433/d");
}

#[test]
fn redaction_hides_password_everywhere() {
    let u = StoreUrl::parse("postgres://app:hunter2@h/d?password=hunter3&sslmode=disable").unwrap();
    let shown = u.redacted().to_string();
    assert_eq!(shown, "postgres://app:***@h:5432/d?password=***&sslmode=disable");
    let debug = format!("{u:?}");
    assert!(!debug.contains("hunter"), "{debug}");
    assert!(debug.contains("***"));
}

#[test]
fn connection_string_round_trips() {
    let s = "postgres://us%40er:p%3Ass%2Fw@h:5432/my%20db?sslmode=require";
    let u = StoreUrl::parse(s).unwrap();
    assert_eq!(u.expose_connection_string(), s);
    assert_eq!(StoreUrl::parse(&u.expose_connection_string()).unwrap(), u);
}

#[test]
fn refusals() {
    let cases = [
        ("http://u@h/d", "unsupported scheme"),
        ("postgres://u@h", "no database"),
        ("postgres://h/d", "no user"),
        ("postgres://u@h/d/e", "single database"),
        ("not a url", "not a valid URL"),
        ("postgres://u@h:99999/d", "not a valid URL"),
        ("mongodb+srv://h:27017/d", "must not name a port"),
        ("postgres://u:%ff@h/d", "password is not UTF-8"),
    ];
    for (s, want) in cases {
        let err = StoreUrl::parse(s).unwrap_err();
        assert!(err.contains(want), "{s}: {err}");
    }
}

#[test]
fn query_plus_is_literal_as_in_libpq() {
    let u = StoreUrl::parse("postgres://u@h/d?options=-c%20a%3Db+c&x=").unwrap();
    assert_eq!(u.param("options"), Some("-c a=b+c"));
    assert_eq!(u.param("x"), Some(""));
    let err = StoreUrl::parse("postgres://u@h/d?sslmode").unwrap_err();
    assert!(err.contains("sslmode"), "{err}");
}
