//! The users file (`[auth] users_file`): who may log in to the proxy, and
//! with what credential.
//!
//! ```toml
//! [[users]]
//! name = "app"
//! password = "app-secret"
//! # or: secret = "SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>"
//! # or: secret = "md5<32 hex digits>"
//! ```
//!
//! Secrets use PostgreSQL's `pg_authid.rolpassword` formats, so they can be
//! copied from the OLD store
//! (<https://www.postgresql.org/docs/current/catalog-pg-authid.html>). They
//! are kept as raw strings here; the authentication code parses them.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize, Serializer};

use crate::error::{toml_error_line, ConfigError, Problem};
use crate::settings::AuthMethod;

/// The contents of a users file, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct UsersFile {
    /// The users, in file order; names are unique.
    pub users: Vec<UserEntry>,
}

/// One `[[users]]` entry.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct UserEntry {
    /// The role name clients log in with.
    pub name: String,
    /// How the proxy checks that client's password (serialized as its kind
    /// only).
    pub credential: UserCredential,
}

/// A user's credential. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum UserCredential {
    /// `password = "..."`: the plaintext password; works with every method.
    Password(String),
    /// `secret = "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"`,
    /// raw; works with `scram-sha-256`.
    ScramSecret(String),
    /// `secret = "md5<hex of md5(password || username)>"`, raw; works with
    /// `md5`.
    Md5Secret(String),
}

impl UserCredential {
    /// `password`, `scram-sha-256` or `md5`: what kind of credential this is.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Password(_) => "password",
            Self::ScramSecret(_) => "scram-sha-256",
            Self::Md5Secret(_) => "md5",
        }
    }

    /// Whether this credential can answer `method`.
    pub fn supports(&self, method: AuthMethod) -> bool {
        matches!(
            (self, method),
            (_, AuthMethod::Trust)
                | (Self::Password(_), _)
                | (Self::ScramSecret(_), AuthMethod::ScramSha256)
                | (Self::Md5Secret(_), AuthMethod::Md5)
        )
    }
}

impl fmt::Debug for UserCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let variant = match self {
            Self::Password(_) => "Password",
            Self::ScramSecret(_) => "ScramSecret",
            Self::Md5Secret(_) => "Md5Secret",
        };
        write!(f, "{variant}(\"***\")")
    }
}

impl Serialize for UserCredential {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.kind())
    }
}

impl fmt::Debug for UserEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserEntry")
            .field("name", &self.name)
            .field("credential", &self.credential)
            .finish()
    }
}

impl UsersFile {
    /// Reads and validates a users file for `method`.
    pub fn load(path: &Path, method: AuthMethod) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            what: "users file",
            path: path.to_path_buf(),
            source,
        })?;
        parse(&text, Some(path), method)
    }

    /// Parses and validates users-file text for `method` (errors name
    /// `<string>` as the file).
    pub fn from_toml_str(text: &str, method: AuthMethod) -> Result<Self, ConfigError> {
        parse(text, None, method)
    }

    /// The entry for `name`, if any.
    pub fn get(&self, name: &str) -> Option<&UserEntry> {
        self.users.iter().find(|u| u.name == name)
    }
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsersFile {
    #[serde(default)]
    users: Vec<RawUser>,
}

/// One `[[users]]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password: Option<String>,
    secret: Option<String>,
}

fn parse(text: &str, file: Option<&Path>, method: AuthMethod) -> Result<UsersFile, ConfigError> {
    let raw: RawUsersFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        origin: file.map_or_else(|| "<string>".to_string(), |p| p.display().to_string()),
        message: toml_error_line(text, &e),
    })?;
    let mut problems = Vec::new();
    let mut problem = |key: String, message: String| {
        problems.push(Problem {
            file: file.map(Path::to_path_buf),
            key,
            message,
        });
    };
    if raw.users.is_empty() && method != AuthMethod::Trust {
        problem(
            "users".to_string(),
            format!("no [[users]] defined; auth method {method} needs at least one"),
        );
    }
    let mut seen = HashSet::new();
    let mut users = Vec::with_capacity(raw.users.len());
    for (i, user) in raw.users.into_iter().enumerate() {
        let key = format!("users[{i}]");
        let name = user.name;
        if name.is_empty() || name.contains('\0') {
            problem(
                format!("{key}.name"),
                format!("user name {name:?} must be non-empty and contain no NUL"),
            );
        }
        if !seen.insert(name.clone()) {
            problem(
                format!("{key}.name"),
                format!("user {name:?} is defined more than once"),
            );
        }
        let credential = match (user.password, user.secret) {
            (Some(_), Some(_)) => {
                problem(
                    key,
                    format!("user {name:?}: give either password or secret, not both"),
                );
                continue;
            }
            (None, None) => {
                problem(key, format!("user {name:?}: give a password or a secret"));
                continue;
            }
            (Some(password), None) if password.is_empty() => {
                problem(
                    format!("{key}.password"),
                    format!("user {name:?}: the password is empty"),
                );
                continue;
            }
            (Some(password), None) => UserCredential::Password(password),
            (None, Some(secret)) => match classify_secret(&secret) {
                Ok(credential) => credential,
                Err(why) => {
                    problem(format!("{key}.secret"), format!("user {name:?}: {why}"));
                    continue;
                }
            },
        };
        if !credential.supports(method) {
            let need = match method {
                AuthMethod::Md5 => "a password or an md5 secret",
                _ => "a password or a SCRAM-SHA-256 secret",
            };
            problem(
                format!("{key}.secret"),
                format!(
                    "user {name:?}: a {} secret cannot answer auth method {method}; give {need}",
                    credential.kind()
                ),
            );
            continue;
        }
        users.push(UserEntry { name, credential });
    }
    if problems.is_empty() {
        Ok(UsersFile { users })
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Recognises a `pg_authid.rolpassword`-style secret and checks its shape.
fn classify_secret(secret: &str) -> Result<UserCredential, String> {
    if let Some(rest) = secret.strip_prefix("SCRAM-SHA-256$") {
        check_scram_shape(rest).map_err(|why| {
            format!("malformed SCRAM secret ({why}); expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")
        })?;
        Ok(UserCredential::ScramSecret(secret.to_string()))
    } else if let Some(hex) = secret.strip_prefix("md5") {
        if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(
                "malformed md5 secret; expected \"md5\" followed by 32 lowercase hex digits".to_string(),
            );
        }
        Ok(UserCredential::Md5Secret(secret.to_string()))
    } else {
        Err("unrecognised secret; expected \"SCRAM-SHA-256$...\" or \"md5<32 hex digits>\" (use password = \"...\" for a plaintext password)".to_string())
    }
}

/// Checks `<iterations>:<salt>$<StoredKey>:<ServerKey>` without decoding.
/// PostgreSQL's format: src/backend/libpq/auth-scram.c, `parse_scram_secret`.
fn check_scram_shape(rest: &str) -> Result<(), &'static str> {
    let (iter_salt, keys) = rest.split_once('$').ok_or("no '$' before the keys")?;
    let (iterations, salt) = iter_salt
        .split_once(':')
        .ok_or("no ':' after the iteration count")?;
    match iterations.parse::<u32>() {
        Ok(n) if n > 0 => {}
        _ => return Err("the iteration count is not a positive integer"),
    }
    let (stored, server) = keys
        .split_once(':')
        .ok_or("no ':' between StoredKey and ServerKey")?;
    if salt.is_empty() || !is_base64(salt) {
        return Err("the salt is not base64");
    }
    // SHA-256 keys are 32 bytes, 44 base64 characters with padding.
    if stored.len() != 44 || !is_base64(stored) || server.len() != 44 || !is_base64(server) {
        return Err("StoredKey and ServerKey must each be 32 bytes in base64");
    }
    Ok(())
}

fn is_base64(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    s.len() - body.len() <= 2
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}
