//! Invalid configurations: every refusal names the key (or file, or
//! environment variable) at fault.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{assert_mentions, env, error, error_in, error_value, no_env, Scratch, MINIMAL};
use switchyard_config::{Config, ConfigError};

/// `MINIMAL` with `extra` appended (later sections are fine in TOML).
fn with(extra: &str) -> String {
    format!("{MINIMAL}\n{extra}\n")
}

#[test]
fn unknown_key_in_section() {
    let e = error(&with("[proxy]\nlisen = \"127.0.0.1:1\""));
    assert_mentions(&e, &["lisen", "proxy"]);
}

#[test]
fn unknown_top_level_section() {
    let e = error(&with("[proxies]\nlisten = \"127.0.0.1:1\""));
    assert_mentions(&e, &["proxies"]);
}

#[test]
fn unknown_key_in_table_entry() {
    let e = error(&with("[[tables]]\nname = \"t\"\nphase = \"done\"\nshare = 3"));
    assert_mentions(&e, &["share", "tables"]);
}

#[test]
fn toml_syntax_error_gives_line() {
    let e = error("[old]\nurl = \"postgres://u@h/d\n");
    assert_mentions(&e, &["<string>", "line 2"]);
}

#[test]
fn wrong_type_names_key() {
    let e = error(&with("[proxy]\nmax_connections = \"many\""));
    assert_mentions(&e, &["proxy.max_connections"]);
}

#[test]
fn file_types_are_strict() {
    let e = error(&with("[proxy]\nlisten = 6432"));
    assert_mentions(&e, &["proxy.listen", "line 10", "expected a string"]);
    let e = error(&with("[[tables]]\nname = 5\nphase = \"done\""));
    assert_mentions(&e, &["tables[0].name", "expected a string"]);
    let e = error(&with("[[tables]]\nname = \"a\"\nphase = \"done\"\n[[tables]]\nname = \"b\"\nphase = \"done\"\nread_share = 1.5"));
    assert_mentions(&e, &["tables[1].read_share"]);
}

#[test]
fn missing_urls() {
    let e = error("[auth]\nmethod = \"trust\"\n");
    assert_mentions(
        &e,
        &["old.url: missing", "new.url: missing", "SWITCHYARD_OLD__URL"],
    );
    // One line per problem.
    assert_eq!(e.lines().count(), 2, "{e}");
    let e = error("[old]\n[new]\nurl = \"postgres://u@h/d\"\n[auth]\nmethod = \"trust\"\n");
    assert_mentions(&e, &["old.url: missing"]);
}

#[test]
fn bad_store_urls() {
    let cases = [
        ("http://u@h/d", "unsupported scheme \"http\""),
        ("postgres://u@h", "no database"),
        ("::nonsense", "not a valid URL"),
    ];
    for (url, why) in cases {
        let text = MINIMAL.replace("postgres://u@127.0.0.1:5432/old_db", url);
        let e = error(&text);
        assert_mentions(&e, &["old.url", why]);
    }
}

#[test]
fn same_database_twice() {
    let text = MINIMAL.replace("new_db", "old_db");
    assert_mentions(&error(&text), &["new.url", "same database"]);
}

#[test]
fn bad_listen_addresses() {
    let e = error(&with("[proxy]\nlisten = \"localhost\"\nadmin_listen = \"\""));
    assert_mentions(
        &e,
        &["proxy.listen", "\"localhost\"", "proxy.admin_listen", "\"off\""],
    );
}

#[test]
fn numeric_ranges() {
    let cases = [
        ("max_connections = 0", "proxy.max_connections"),
        ("max_message_bytes = 1023", "proxy.max_message_bytes"),
        ("max_message_bytes = 2147483648", "proxy.max_message_bytes"),
        ("connect_timeout_ms = 0", "proxy.connect_timeout_ms"),
        ("client_idle_timeout_secs = -1", "proxy.client_idle_timeout_secs"),
        ("tcp_keepalive_secs = 40000", "proxy.tcp_keepalive_secs"),
        ("shutdown_grace_secs = -5", "proxy.shutdown_grace_secs"),
    ];
    for (line, key) in cases {
        let e = error(&with(&format!("[proxy]\n{line}")));
        assert_mentions(&e, &[key, "out of range"]);
    }
}

/// TLS toward the stores: what cannot be honoured is refused at load, naming the URL key and
/// the parameter; a named file must be readable; what can be honoured loads.
#[test]
fn store_tls_that_cannot_be_honoured_is_refused() {
    let scratch = Scratch::new();
    let ca = scratch.write("ca.pem", "not checked at load beyond being readable");
    let ca = ca.display().to_string();
    let missing = scratch.dir.join("missing.pem").display().to_string();
    for (query, words) in [
        (
            "sslmode=bogus".to_owned(),
            vec!["old.url", "unknown sslmode", "verify-full"],
        ),
        (
            "sslmode=verify-full".to_owned(),
            vec!["old.url", "sslmode=verify-full needs sslrootcert"],
        ),
        (
            "sslmode=verify-ca".to_owned(),
            vec!["old.url", "sslmode=verify-ca needs sslrootcert"],
        ),
        (
            format!("sslmode=verify-ca&sslrootcert={missing}"),
            vec!["old.url", "sslrootcert", "missing.pem", "cannot be read"],
        ),
        (
            "sslrootcert=system".to_owned(),
            vec!["old.url", "sslrootcert=system", "not supported"],
        ),
        (
            format!("sslmode=disable&sslcrl={ca}"),
            vec!["old.url", "sslcrl", "not supported"],
        ),
        (
            format!("sslcert={ca}"),
            vec!["old.url", "sslcert is given without sslkey"],
        ),
        (
            "sslnegotiation=direct".to_owned(),
            vec!["old.url", "sslnegotiation=direct"],
        ),
    ] {
        let text = MINIMAL.replacen("/old_db\"", &format!("/old_db?{query}\""), 1);
        assert!(text.contains(&query), "the fixture changed: {text}");
        let e = error(&text);
        assert_mentions(&e, &words);
    }
    for query in [
        "sslmode=disable".to_owned(),
        "sslmode=allow".to_owned(),
        "sslmode=prefer".to_owned(),
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        format!("sslmode=verify-full&sslrootcert={ca}&sslcert={ca}&sslkey={ca}"),
    ] {
        let text = MINIMAL.replacen("/new_db\"", &format!("/new_db?{query}\""), 1);
        assert!(text.contains(&query), "the fixture changed: {text}");
        let config = Config::from_toml_str(&text, std::collections::HashMap::new())
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        let tls = switchyard_config::StoreTls::of(&config.new.url).unwrap();
        assert_eq!(
            tls.mode.as_str(),
            query.trim_start_matches("sslmode=").split('&').next().unwrap()
        );
    }
}

#[test]
fn control_and_admin_values() {
    for (section, key) in [
        ("[control]\nmax_drift_rate = 1.5", "control.max_drift_rate"),
        ("[control]\nmax_drift_rate = -0.1", "control.max_drift_rate"),
        ("[control]\npoll_interval_ms = 10", "control.poll_interval_ms"),
        ("[control]\nmax_drift_age_secs = 0", "control.max_drift_age_secs"),
    ] {
        let e = error(&with(section));
        assert_mentions(&e, &[key, "out of range"]);
    }
    let e = error(&with("[admin]\ntoken = \"short\""));
    assert_mentions(&e, &["admin.token", "shorter than 16"]);
    let config = Config::from_toml_str(
        &with("[admin]\ntoken = \"0123456789abcdef0123\"\n[control]\nmax_drift_rate = 0.01"),
        std::collections::HashMap::new(),
    )
    .unwrap();
    assert_eq!(config.control.max_drift_rate, 0.01);
    let shown = format!("{config:?} {}", toml::to_string(&config).unwrap());
    assert!(
        !shown.contains("0123456789abcdef"),
        "the token is never printed: {shown}"
    );
}

#[test]
fn unknown_phase_lists_valid_ones() {
    let e = error(&with("[[tables]]\nname = \"accounts\"\nphase = \"shifting\""));
    assert_mentions(
        &e,
        &[
            "tables[0].phase",
            "public.accounts",
            "\"shifting\"",
            "passthrough, dual_write, shadow_read, read_shift, cutover, done",
        ],
    );
}

#[test]
fn missing_phase_and_name() {
    let e = error(&with("[[tables]]\nread_share = 1"));
    assert_mentions(&e, &["tables[0].name: missing", "tables[0].phase", "missing"]);
}

#[test]
fn read_share_out_of_range() {
    for key in ["read_share", "shadow_share"] {
        for share in ["101", "-1"] {
            let e = error(&with(&format!(
                "[[tables]]\nname = \"a\"\nphase = \"read_shift\"\n\n[[tables]]\nname = \"b\"\nphase = \"shadow_read\"\n{key} = {share}"
            )));
            assert_mentions(&e, &[&format!("tables[1].{key}"), "public.b", share]);
        }
    }
}

#[test]
fn duplicate_tables_after_normalising() {
    let e = error(&with(
        "[[tables]]\nname = \"accounts\"\nphase = \"done\"\n[[tables]]\nname = \"public.accounts\"\nphase = \"done\"",
    ));
    assert_mentions(&e, &["tables[1].name", "public.accounts", "tables[0]"]);
}

#[test]
fn bad_table_name() {
    let e = error(&with("[[tables]]\nname = \"a.b.c\"\nphase = \"done\""));
    assert_mentions(&e, &["tables[0].name", "a.b.c"]);
}

#[test]
fn unknown_auth_method() {
    let e = error(&MINIMAL.replace("\"trust\"", "\"password\""));
    assert_mentions(&e, &["auth.method", "\"password\"", "trust, md5, scram-sha-256"]);
}

#[test]
fn users_file_required_unless_trust() {
    let e = error(&MINIMAL.replace("\"trust\"", "\"md5\""));
    assert_mentions(&e, &["auth.users_file", "missing", "md5"]);
    // Default method is scram-sha-256, which needs one too.
    let e = error(&MINIMAL.replace("method = \"trust\"", ""));
    assert_mentions(&e, &["auth.users_file", "scram-sha-256"]);
}

#[test]
fn users_file_unreadable_names_path() {
    let scratch = Scratch::new();
    let text = MINIMAL.replace("method = \"trust\"", "users_file = \"no-such-users.toml\"");
    let e = error_in(&text, no_env(), &scratch.dir);
    let path = scratch.dir.join("no-such-users.toml");
    assert_mentions(&e, &["auth.users_file", &path.display().to_string()]);
}

#[test]
fn users_file_problems_name_file_and_user() {
    let scratch = Scratch::new();
    let users = scratch.write(
        "users.toml",
        "[[users]]\nname = \"bob\"\nsecret = \"md5d41d8cd98f00b204e9800998ecf8427e\"\n",
    );
    let text = MINIMAL.replace("method = \"trust\"", "users_file = \"users.toml\"");
    let e = error_in(&text, no_env(), &scratch.dir);
    assert_mentions(
        &e,
        &[
            &users.display().to_string(),
            "users[0]",
            "\"bob\"",
            "md5",
            "scram-sha-256",
        ],
    );
}

#[test]
fn users_file_syntax_error_names_path() {
    let scratch = Scratch::new();
    let users = scratch.write("users.toml", "[[users]]\nname = \"bob\"\npasword = \"x\"\n");
    let text = MINIMAL.replace("method = \"trust\"", "users_file = \"users.toml\"");
    let e = error_in(&text, no_env(), &scratch.dir);
    assert_mentions(
        &e,
        &[
            "auth.users_file",
            &users.display().to_string(),
            "pasword",
            "line 3",
        ],
    );
}

#[test]
fn telemetry_problems() {
    let e = error(&with(
        "[telemetry]\nlog_format = \"xml\"\nlog_level = \"\"\notlp_endpoint = \"https://collector:4318\"\nservice_name = \" \"\nsampler = 1",
    ));
    assert_mentions(&e, &["sampler"]);
    let e = error(&with(
        "[telemetry]\nlog_format = \"xml\"\nlog_level = \"\"\notlp_endpoint = \"https://collector:4318\"\nservice_name = \" \"",
    ));
    assert_mentions(
        &e,
        &[
            "telemetry.log_format",
            "\"xml\"",
            "telemetry.log_level",
            "telemetry.otlp_endpoint",
            "http://",
            "telemetry.service_name",
        ],
    );
    let e = error(&with("[telemetry]\notlp_endpoint = \"not a url\""));
    assert_mentions(&e, &["telemetry.otlp_endpoint", "not a valid URL"]);
}

#[test]
fn all_problems_are_collected() {
    let err = error_value(
        "[proxy]\nlisten = \"x\"\n[auth]\nmethod = \"nope\"\n[[tables]]\nname = \"t\"\nphase = \"p\"\nread_share = 500\n",
    );
    let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
    for key in [
        "proxy.listen",
        "old.url",
        "new.url",
        "auth.method",
        "tables[0].phase",
        "tables[0].read_share",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    assert_eq!(err.to_string().lines().count(), err.problems().len());
}

#[test]
fn environment_values_are_checked_and_named() {
    let e = error_in(
        MINIMAL,
        env(&[("SWITCHYARD_PROXY__LISTEN", "nowhere")]),
        Path::new("."),
    );
    assert_mentions(&e, &["proxy.listen", "SWITCHYARD_PROXY__LISTEN"]);
    let e = error_in(
        MINIMAL,
        env(&[("SWITCHYARD_OLD__URL", "ftp://x/y")]),
        Path::new("."),
    );
    assert_mentions(&e, &["old.url", "SWITCHYARD_OLD__URL", "ftp"]);
}

#[test]
fn unknown_environment_keys_are_refused() {
    let e = error_in(
        MINIMAL,
        env(&[("SWITCHYARD_PROXY__LISEN", "127.0.0.1:1")]),
        Path::new("."),
    );
    assert_mentions(&e, &["environment variable SWITCHYARD_PROXY__LISEN", "lisen"]);
    let e = error_in(
        MINIMAL,
        env(&[
            ("SWITCHYARD_PROXY__MAX_CONNECTIONS", "lots"),
            ("SWITCHYARD_PROXY__LISTEN", "127.0.0.1:1"),
        ]),
        Path::new("."),
    );
    assert_mentions(
        &e,
        &[
            "environment variable SWITCHYARD_PROXY__MAX_CONNECTIONS:",
            "proxy.max_connections",
        ],
    );
    let e = error_in(
        MINIMAL,
        env(&[("SWITCHYARD_PROXI__LISTEN", "127.0.0.1:1")]),
        Path::new("."),
    );
    assert_mentions(&e, &["SWITCHYARD_PROXI__LISTEN", "unknown section \"proxi\""]);
    let e = error_in(
        MINIMAL,
        env(&[("SWITCHYARD_TABLES__0__PHASE", "done")]),
        Path::new("."),
    );
    assert_mentions(&e, &["SWITCHYARD_TABLES__0__PHASE", "[[tables]]"]);
    let e = error_in(
        MINIMAL,
        env(&[("SWITCHYARD_PROXY__LISTEN__X", "1")]),
        Path::new("."),
    );
    assert_mentions(&e, &["SWITCHYARD_PROXY__LISTEN__X"]);
}

#[test]
fn missing_config_file_names_path() {
    let scratch = Scratch::new();
    let path = scratch.dir.join("absent.toml");
    let err = Config::load_with_env(&path, no_env()).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert_mentions(&err.to_string(), &["config file", &path.display().to_string()]);
}

#[test]
fn file_errors_name_the_file() {
    let scratch = Scratch::new();
    let path = scratch.write("bad.toml", &with("[proxy]\nlisen = 1"));
    let err = Config::load_with_env(&path, no_env()).unwrap_err();
    assert_mentions(
        &err.to_string(),
        &[&path.display().to_string(), "line 10", "proxy.lisen"],
    );
}

#[test]
fn bad_upstream_login_and_auth_lookup_values() {
    let stores = "[old]\nurl = \"postgres://u@127.0.0.1:5432/old_db\"\n[new]\nurl = \"postgres://u@127.0.0.1:5432/new_db\"\n";
    let auth = |lines: &str| error(&format!("{stores}[auth]\n{lines}\n"));
    let e = auth("method = \"trust\"\nupstream_login = \"admin\"");
    assert_mentions(&e, &["auth.upstream_login", "client", "service"]);
    let e = error(&with("[proxy]\nother_databases = \"maybe\""));
    assert_mentions(&e, &["proxy.other_databases", "passthrough", "refuse"]);
    let e = auth("method = \"trust\"\nauth_query = \"SELECT 1\"");
    assert_mentions(&e, &["auth.auth_query", "auth_lookup"]);
    let e = auth("method = \"scram-sha-256\"\nauth_lookup = \"old\"\nauth_query = \"SELECT usename, passwd FROM pg_shadow\"");
    assert_mentions(&e, &["auth.auth_query", "$1"]);
    let e = auth("method = \"md5\"");
    assert_mentions(&e, &["auth.users_file", "auth_lookup"]);
}
