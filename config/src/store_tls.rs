//! TLS toward a PostgreSQL store, as its URL asks: `sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey`, read with libpq's meaning and defaults.
//! <https://www.postgresql.org/docs/current/libpq-ssl.html>
//! <https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNECT-SSLMODE>

use std::fmt;
use std::path::{Path, PathBuf};

use crate::store_url::StoreUrl;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// Plain text first; TLS if the server refuses the plain-text login.
    Allow,
    /// TLS first (without verifying the server); plain text if the server answers `N` to the
    /// SSLRequest or the TLS attempt fails. libpq's default.
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is verified only when a root certificate is given
    /// (then as `VerifyCa`).
    Require,
    /// TLS, and the server's certificate chain verified against the root certificate.
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the host (or IP address) connected to.
    VerifyFull,
}

impl SslMode {
    /// The mode as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(s: &str) -> Option<SslMode> {
        [
            SslMode::Disable,
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }

    /// Whether the server's certificate chain is verified.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a store URL asks of TLS, with libpq's defaults applied: an absent `sslmode` is `prefer`;
/// an absent `sslrootcert` is `~/.postgresql/root.crt` when that file exists (and `require`
/// then verifies the chain, as libpq does); an absent `sslcert`/`sslkey` pair is
/// `~/.postgresql/postgresql.crt` / `postgresql.key` when both exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreTls {
    /// The effective mode (`require` with a root certificate is `VerifyCa`).
    pub mode: SslMode,
    /// PEM file of the certificates trusted to sign the server's certificate.
    pub root_cert: Option<PathBuf>,
    /// PEM client certificate (chain) and its private key, sent when the server asks.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// URL parameters about TLS that are not supported: refused at load rather than ignored.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("sslcrl", "certificate revocation lists are not supported"),
    ("sslcrldir", "certificate revocation lists are not supported"),
    (
        "sslpassword",
        "encrypted private keys are not supported; give sslkey unencrypted",
    ),
    (
        "sslcertmode",
        "is not supported; a client certificate is sent whenever sslcert and sslkey are given",
    ),
    (
        "gssencmode",
        "GSSAPI encryption is not supported; remove it (or set gssencmode=disable)",
    ),
];

impl StoreTls {
    /// The TLS settings of `url`, or what is wrong with them (naming the URL parameter).
    pub fn of(url: &StoreUrl) -> Result<StoreTls, String> {
        Self::with_home(url, home_postgresql_dir().as_deref())
    }

    /// As [`StoreTls::of`], with libpq's per-user files looked up in `dot_postgresql` (the
    /// `~/.postgresql` directory) when given.
    pub fn with_home(url: &StoreUrl, dot_postgresql: Option<&Path>) -> Result<StoreTls, String> {
        let mut mode = match url.param("sslmode") {
            None => SslMode::Prefer,
            Some(s) => SslMode::parse(s).ok_or_else(|| {
                format!(
                    "unknown sslmode {s:?}; expected disable, allow, prefer, require, verify-ca or verify-full"
                )
            })?,
        };
        for (param, why) in UNSUPPORTED {
            match url.param(param) {
                Some("disable") if *param == "gssencmode" => {}
                Some(_) => return Err(format!("{param}: {why}")),
                None => {}
            }
        }
        if let Some(v) = url.param("sslnegotiation") {
            if v != "postgres" {
                return Err(format!(
                    "sslnegotiation={v}: only the SSLRequest negotiation (sslnegotiation=postgres) is supported"
                ));
            }
        }
        let default_file = |name: &str| {
            dot_postgresql
                .map(|dir| dir.join(name))
                .filter(|path| path.is_file())
        };
        let root_cert = match url.param("sslrootcert") {
            Some("") => return Err("sslrootcert is empty; name a PEM file".to_owned()),
            Some("system") => {
                return Err(
                    "sslrootcert=system is not supported; name the PEM file of the certificates to trust"
                        .to_owned(),
                )
            }
            Some(path) => Some(PathBuf::from(path)),
            None => default_file("root.crt"),
        };
        if mode.verifies() && root_cert.is_none() {
            return Err(format!(
                "sslmode={mode} needs sslrootcert (the PEM file of the certificates that sign the \
                 server's); none is given and ~/.postgresql/root.crt does not exist"
            ));
        }
        if mode == SslMode::Require && root_cert.is_some() {
            // libpq: "if a root CA file exists, the behavior of sslmode=require will be the
            // same as that of verify-ca".
            mode = SslMode::VerifyCa;
        }
        let client_cert = match (url.param("sslcert"), url.param("sslkey")) {
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (Some(_), None) => return Err("sslcert is given without sslkey".to_owned()),
            (None, Some(_)) => return Err("sslkey is given without sslcert".to_owned()),
            (None, None) => default_file("postgresql.crt").zip(default_file("postgresql.key")),
        };
        Ok(StoreTls {
            mode,
            root_cert,
            client_cert,
        })
    }

    /// The files named, each with the URL parameter it came from.
    pub fn files(&self) -> Vec<(&'static str, &Path)> {
        let mut files = Vec::new();
        if let Some(root) = &self.root_cert {
            files.push(("sslrootcert", root.as_path()));
        }
        if let Some((cert, key)) = &self.client_cert {
            files.push(("sslcert", cert.as_path()));
            files.push(("sslkey", key.as_path()));
        }
        files
    }
}

fn home_postgresql_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".postgresql"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(query: &str) -> Result<StoreTls, String> {
        let url = StoreUrl::parse(&format!("postgres://u@h/db{query}")).map_err(|e| e.to_string())?;
        StoreTls::with_home(&url, None)
    }

    #[test]
    fn libpq_defaults_and_modes() {
        assert_eq!(tls("").unwrap().mode, SslMode::Prefer);
        for mode in ["disable", "allow", "prefer", "require"] {
            assert_eq!(tls(&format!("?sslmode={mode}")).unwrap().mode.as_str(), mode);
        }
        let t = tls("?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(
            t.mode,
            SslMode::VerifyCa,
            "require with a root verifies, as in libpq"
        );
        let t = tls("?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/c.key").unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(t.files().len(), 3);
    }

    #[test]
    fn what_cannot_be_honoured_names_its_parameter() {
        for (query, word) in [
            ("?sslmode=bogus", "unknown sslmode"),
            ("?sslmode=verify-ca", "needs sslrootcert"),
            ("?sslmode=verify-full", "needs sslrootcert"),
            ("?sslrootcert=system", "sslrootcert=system"),
            ("?sslcert=/c.pem", "without sslkey"),
            ("?sslkey=/c.key", "without sslcert"),
            ("?sslcrl=/x.crl", "sslcrl"),
            ("?sslpassword=x", "sslpassword"),
            ("?sslnegotiation=direct", "sslnegotiation=direct"),
            ("?gssencmode=require", "gssencmode"),
        ] {
            let e = tls(query).unwrap_err();
            assert!(e.contains(word), "{query}: {e}");
        }
        assert!(tls("?gssencmode=disable&sslnegotiation=postgres").is_ok());
    }

    #[test]
    fn per_user_files_are_libpq_defaults() {
        let dir = std::env::temp_dir().join(format!("sy-dotpg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = StoreUrl::parse("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(
            StoreTls::with_home(&url, Some(&dir)).unwrap().mode,
            SslMode::Require
        );
        for f in ["root.crt", "postgresql.crt", "postgresql.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let t = StoreTls::with_home(&url, Some(&dir)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(t.mode, SslMode::VerifyCa);
        assert_eq!(t.root_cert, Some(dir.join("root.crt")));
        assert_eq!(
            t.client_cert,
            Some((dir.join("postgresql.crt"), dir.join("postgresql.key")))
        );
    }
}
