//! The users file on its own: formats, validation, method compatibility.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{assert_mentions, Scratch};
use switchyard_config::{AuthMethod, ConfigError, UserCredential, UsersFile};

/// A well-formed SCRAM secret (PostgreSQL's format; the keys are 32 bytes).
const SCRAM: &str = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=";
/// md5("secret" || "bob"), as PostgreSQL stores it.
const MD5: &str = "md5d41d8cd98f00b204e9800998ecf8427e";

fn users(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(name, key, value)| format!("[[users]]\nname = \"{name}\"\n{key} = \"{value}\"\n"))
        .collect()
}

fn err(text: &str, method: AuthMethod) -> String {
    UsersFile::from_toml_str(text, method).unwrap_err().to_string()
}

#[test]
fn all_credential_kinds() {
    let text = users(&[
        ("a", "password", "pw"),
        ("b", "secret", SCRAM),
        ("c", "secret", MD5),
    ]);
    let u = UsersFile::from_toml_str(&text, AuthMethod::Trust).unwrap();
    assert_eq!(u.users.len(), 3);
    assert_eq!(
        u.get("a").unwrap().credential,
        UserCredential::Password("pw".into())
    );
    assert_eq!(
        u.get("b").unwrap().credential,
        UserCredential::ScramSecret(SCRAM.into())
    );
    assert_eq!(
        u.get("c").unwrap().credential,
        UserCredential::Md5Secret(MD5.into())
    );
    assert!(u.get("d").is_none());
}

#[test]
fn method_compatibility() {
    let scram = users(&[("a", "password", "pw"), ("b", "secret", SCRAM)]);
    assert!(UsersFile::from_toml_str(&scram, AuthMethod::ScramSha256).is_ok());
    assert_mentions(
        &err(&scram, AuthMethod::Md5),
        &["users[1]", "\"b\"", "scram-sha-256", "md5"],
    );

    let md5 = users(&[("a", "password", "pw"), ("c", "secret", MD5)]);
    assert!(UsersFile::from_toml_str(&md5, AuthMethod::Md5).is_ok());
    assert_mentions(&err(&md5, AuthMethod::ScramSha256), &["users[1]", "\"c\"", "md5"]);
}

#[test]
fn duplicate_names() {
    let text = users(&[("a", "password", "x"), ("a", "password", "y")]);
    assert_mentions(
        &err(&text, AuthMethod::Trust),
        &["users[1].name", "\"a\"", "more than once"],
    );
}

#[test]
fn exactly_one_of_password_and_secret() {
    let both = format!("[[users]]\nname = \"a\"\npassword = \"x\"\nsecret = \"{MD5}\"\n");
    assert_mentions(&err(&both, AuthMethod::Trust), &["users[0]", "\"a\"", "not both"]);
    let neither = "[[users]]\nname = \"a\"\n";
    assert_mentions(
        &err(neither, AuthMethod::Trust),
        &["users[0]", "\"a\"", "password or a secret"],
    );
    let empty = users(&[("a", "password", "")]);
    assert_mentions(&err(&empty, AuthMethod::Trust), &["users[0].password", "empty"]);
}

#[test]
fn secret_formats() {
    let cases = [
        ("plain-text", "unrecognised secret"),
        ("md5abc", "32 lowercase hex"),
        ("md5D41D8CD98F00B204E9800998ECF8427E", "32 lowercase hex"),
        ("SCRAM-SHA-256$4096:salt", "malformed SCRAM"),
        ("SCRAM-SHA-256$0:c2FsdA==$AAAA:BBBB", "iteration count"),
        ("SCRAM-SHA-256$4096:c2FsdA==$short:short", "32 bytes"),
        ("SCRAM-SHA-256$4096:$AAAA:BBBB", "salt"),
    ];
    for (secret, why) in cases {
        let e = err(&users(&[("bob", "secret", secret)]), AuthMethod::Trust);
        assert_mentions(&e, &["users[0].secret", "\"bob\"", why]);
    }
}

#[test]
fn unknown_keys_and_missing_name() {
    assert_mentions(
        &err("[[users]]\nname = \"a\"\npasswd = \"x\"\n", AuthMethod::Trust),
        &["passwd", "line 3"],
    );
    assert_mentions(&err("[[user]]\nname = \"a\"\n", AuthMethod::Trust), &["user"]);
    assert_mentions(
        &err("[[users]]\npassword = \"x\"\n", AuthMethod::Trust),
        &["name"],
    );
}

#[test]
fn no_users_only_with_trust() {
    assert!(UsersFile::from_toml_str("", AuthMethod::Trust)
        .unwrap()
        .users
        .is_empty());
    assert_mentions(&err("", AuthMethod::ScramSha256), &["users", "at least one"]);
}

#[test]
fn load_names_the_file() {
    let scratch = Scratch::new();
    let missing = scratch.dir.join("missing.toml");
    let e = UsersFile::load(&missing, AuthMethod::Md5).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert_mentions(&e.to_string(), &["users file", &missing.display().to_string()]);

    let path = scratch.write("u.toml", &users(&[("a", "secret", "nope")]));
    let e = UsersFile::load(&path, AuthMethod::Md5).unwrap_err();
    assert_mentions(&e.to_string(), &[&path.display().to_string(), "users[0].secret"]);
}

#[test]
fn debug_hides_credentials() {
    let text = users(&[("a", "password", "hunter2"), ("b", "secret", MD5)]);
    let u = UsersFile::from_toml_str(&text, AuthMethod::Trust).unwrap();
    let debug = format!("{u:?}");
    assert!(!debug.contains("hunter2") && !debug.contains(MD5), "{debug}");
    assert!(debug.contains("\"a\""), "{debug}");
}
