//! Store connection URLs (`[old] url`, `[new] url`).
//!
//! The URL is parsed once into its parts, percent-decoded, so the store
//! adapters never parse URLs themselves. The password never appears in
//! `Debug`, in [`StoreUrl::redacted`] or in serialized output.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};
use url::{Host, Url};

/// The kind of database behind a store URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// PostgreSQL (`postgres://`, `postgresql://`).
    Postgres,
    /// MySQL or MariaDB (`mysql://`, `mariadb://`).
    Mysql,
    /// MongoDB (`mongodb://`, `mongodb+srv://`).
    Mongodb,
}

impl Engine {
    /// The port used when the URL names none.
    pub fn default_port(self) -> u16 {
        match self {
            Self::Postgres => 5432,
            Self::Mysql => 3306,
            Self::Mongodb => 27017,
        }
    }

    /// The lowercase name: `postgres`, `mysql` or `mongodb`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
            Self::Mongodb => "mongodb",
        }
    }

    fn from_scheme(scheme: &str) -> Option<Self> {
        match scheme {
            "postgres" | "postgresql" => Some(Self::Postgres),
            "mysql" | "mariadb" => Some(Self::Mysql),
            "mongodb" | "mongodb+srv" => Some(Self::Mongodb),
            _ => None,
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Query parameters whose values are secrets and are hidden by
/// [`StoreUrl::redacted`] (libpq accepts `password` in the query string:
/// <https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS>).
const SECRET_PARAMS: &[&str] = &["password", "sslpassword"];

/// A parsed, percent-decoded store URL such as
/// `postgres://user:secret@127.0.0.1:5432/shop?sslmode=disable`.
///
/// `Debug`, `Display`-via-[`redacted`](Self::redacted) and `Serialize` hide the
/// password; use [`expose_connection_string`](Self::expose_connection_string)
/// to get the full URL for a driver.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// Which database engine the scheme names.
    pub engine: Engine,
    /// The URL scheme as written (`postgresql`, `mongodb+srv`, ...).
    pub scheme: String,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// The port, or the engine's default port when the URL names none.
    pub port: u16,
    /// The user name, percent-decoded. Required for PostgreSQL and MySQL;
    /// empty when a MongoDB URL names no user.
    pub user: String,
    /// The password, percent-decoded, if the URL has one.
    pub password: Option<String>,
    /// The database (the path without its leading `/`), percent-decoded.
    /// Required for PostgreSQL; may be empty for MySQL and MongoDB.
    pub database: String,
    /// Query parameters in order, percent-decoded (`sslmode=require`, ...).
    pub params: Vec<(String, String)>,
}

impl StoreUrl {
    /// Parses a store URL. The error says what is wrong, without naming a
    /// config key (the caller adds it).
    pub fn parse(input: &str) -> Result<Self, String> {
        let url = Url::parse(input).map_err(|e| format!("not a valid URL: {e}"))?;
        let scheme = url.scheme().to_string();
        let engine = Engine::from_scheme(&scheme).ok_or_else(|| {
            format!(
                "unsupported scheme {scheme:?}; expected postgres://, postgresql://, mysql://, \
                 mariadb://, mongodb:// or mongodb+srv://"
            )
        })?;
        let host = match url.host() {
            Some(Host::Domain(d)) if !d.is_empty() => d.to_string(),
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err("the URL names no host".to_string()),
        };
        if scheme == "mongodb+srv" && url.port().is_some() {
            return Err("a mongodb+srv:// URL must not name a port".to_string());
        }
        let port = url.port().unwrap_or_else(|| engine.default_port());
        let user = percent_decode(url.username()).map_err(|e| format!("user name {e}"))?;
        let password = url
            .password()
            .map(percent_decode)
            .transpose()
            .map_err(|e| format!("password {e}"))?;
        let path = url.path().strip_prefix('/').unwrap_or(url.path());
        if path.contains('/') {
            return Err(format!(
                "the path {:?} must be a single database name",
                url.path()
            ));
        }
        let database = percent_decode(path).map_err(|e| format!("database name {e}"))?;
        if engine != Engine::Mongodb && user.is_empty() {
            return Err(format!("the URL names no user; write {scheme}://USER@{host}/..."));
        }
        if engine == Engine::Postgres && database.is_empty() {
            return Err(format!(
                "the URL names no database; write {scheme}://{user}@{host}:{port}/DATABASE"
            ));
        }
        let params = parse_query(url.query().unwrap_or(""))?;
        Ok(Self {
            engine,
            scheme,
            host,
            port,
            user,
            password,
            database,
            params,
        })
    }

    /// The value of the first query parameter called `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A `Display` of the URL with the password (and secret query
    /// parameters) replaced by `***`, safe for logs and `/status`.
    pub fn redacted(&self) -> RedactedStoreUrl<'_> {
        RedactedStoreUrl {
            url: self,
            reveal: false,
        }
    }

    /// The full URL including the password, percent-encoded, for handing to
    /// a database driver. Never log this.
    pub fn expose_connection_string(&self) -> String {
        RedactedStoreUrl {
            url: self,
            reveal: true,
        }
        .to_string()
    }
}

impl FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreUrl")
            .field("engine", &self.engine)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("database", &self.database)
            .field("params", &RedactedParams(&self.params))
            .finish()
    }
}

/// Serializes as the redacted URL string.
impl Serialize for StoreUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.redacted())
    }
}

/// Query parameters with secret values hidden, for `Debug`.
struct RedactedParams<'a>(&'a [(String, String)]);

impl fmt::Debug for RedactedParams<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, v)| {
                let v = if is_secret_param(k) { "***" } else { v.as_str() };
                (k.as_str(), v)
            }))
            .finish()
    }
}

fn is_secret_param(name: &str) -> bool {
    SECRET_PARAMS.iter().any(|s| s.eq_ignore_ascii_case(name))
}

/// The URL rebuilt from its parts; see [`StoreUrl::redacted`].
pub struct RedactedStoreUrl<'a> {
    url: &'a StoreUrl,
    reveal: bool,
}

impl fmt::Display for RedactedStoreUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = self.url;
        write!(f, "{}://", u.scheme)?;
        if !u.user.is_empty() || u.password.is_some() {
            write!(f, "{}", PercentEncoded(&u.user))?;
            match &u.password {
                Some(p) if self.reveal => write!(f, ":{}", PercentEncoded(p))?,
                Some(_) => f.write_str(":***")?,
                None => {}
            }
            f.write_str("@")?;
        }
        if u.host.contains(':') {
            write!(f, "[{}]", u.host)?;
        } else {
            f.write_str(&u.host)?;
        }
        if u.scheme != "mongodb+srv" {
            write!(f, ":{}", u.port)?;
        }
        write!(f, "/{}", PercentEncoded(&u.database))?;
        for (i, (k, v)) in u.params.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            if is_secret_param(k) && !self.reveal {
                write!(f, "{sep}{}=***", PercentEncoded(k))?;
            } else {
                write!(f, "{sep}{}={}", PercentEncoded(k), PercentEncoded(v))?;
            }
        }
        Ok(())
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
struct PercentEncoded<'a>(&'a str);

impl fmt::Display for PercentEncoded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                write!(f, "{}", char::from(b))?;
            } else {
                write!(f, "%{b:02X}")?;
            }
        }
        Ok(())
    }
}

/// Splits `a=1&b=2` into decoded pairs. `+` stays `+`, as in libpq's URI
/// parser (only `%XX` escapes are decoded).
fn parse_query(query: &str) -> Result<Vec<(String, String)>, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("query parameter {pair:?} has no value"))?;
            let k = percent_decode(k).map_err(|e| format!("query parameter {k:?} {e}"))?;
            let v = percent_decode(v).map_err(|e| format!("query parameter {k:?} value {e}"))?;
            Ok((k, v))
        })
        .collect()
}

/// Decodes `%XX` escapes; the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "has a bad %-escape".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8 after %-decoding".to_string())
}
