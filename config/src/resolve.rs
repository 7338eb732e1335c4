//! Turns the raw, as-written configuration into the typed [`Config`],
//! applying defaults and collecting every problem with its key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use url::Url;

use crate::error::{ConfigError, Problem};
use crate::raw::{
    RawAdmin, RawAuth, RawConfig, RawControl, RawMirror, RawProxy, RawStore, RawTable, RawTelemetry, RawTls,
};
use crate::settings::{
    AdminSettings, AuthMethod, AuthSettings, ControlSettings, MirrorSettings, OtherDatabases, ProxySettings,
    StoreSettings, TelemetrySettings, TlsMode, TlsSettings, UpstreamLogin, DEFAULT_AUTH_QUERY,
};
use crate::store_url::StoreUrl;
use crate::tables::{Phase, TableName, TableSettings, UncapturedPolicy, DEFAULT_SHADOW_SHARE};
use crate::users::UsersFile;
use crate::Config;

/// PostgreSQL refuses messages above `PQ_LARGE_MESSAGE_LIMIT` (1 GiB - 1,
/// src/include/libpq/libpq.h), so a larger cap would only waste memory.
const MAX_MESSAGE_BYTES_LIMIT: i64 = 1 << 30;

/// Linux caps TCP_KEEPIDLE at 32767 s (MAX_TCP_KEEPIDLE, include/net/tcp.h).
const MAX_KEEPALIVE_SECS: i64 = 32_767;

/// Validation state: the problems found so far and where overrides came from.
pub(crate) struct Resolver<'a> {
    problems: Vec<Problem>,
    /// Key path (`proxy.listen`) -> the environment variable that set it.
    env_keys: &'a HashMap<String, String>,
    /// What relative `users_file` paths are relative to.
    base_dir: &'a Path,
}

impl<'a> Resolver<'a> {
    pub(crate) fn new(env_keys: &'a HashMap<String, String>, base_dir: &'a Path) -> Self {
        Self {
            problems: Vec::new(),
            env_keys,
            base_dir,
        }
    }

    /// Records `message` against `key`, naming the environment variable if
    /// one set the key.
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        let mut message = message.into();
        if let Some(var) = self.env_keys.get(key) {
            message.push_str(&format!(" (set by environment variable {var})"));
        }
        self.problems.push(Problem::new(key, message));
    }

    /// A percentage from 0 to 100 (`default` when unset); a problem against `key` otherwise
    /// (`which` names the table).
    fn percent(&mut self, key: &str, which: &str, value: Option<i64>, default: u8) -> Option<u8> {
        match value {
            None => Some(default),
            Some(v @ 0..=100) => u8::try_from(v).ok(),
            Some(v) => {
                self.problem(key, format!("{which}{v} is not a percentage from 0 to 100"));
                None
            }
        }
    }

    /// Resolves the whole configuration, or returns every problem found
    /// (plus `earlier`, problems found before parsing).
    pub(crate) fn resolve(mut self, raw: RawConfig, earlier: Vec<Problem>) -> Result<Config, ConfigError> {
        self.problems = earlier;
        let proxy = self.proxy(raw.proxy.unwrap_or_default());
        let old = self.store("old", raw.old.unwrap_or_default());
        let new = self.store("new", raw.new.unwrap_or_default());
        if let (Some(o), Some(n)) = (&old, &new) {
            let same = |u: &StoreUrl| (u.engine, u.host.clone(), u.port, u.database.clone());
            if same(&o.url) == same(&n.url) {
                self.problem(
                    "new.url",
                    "names the same database as old.url; OLD and NEW must be different databases",
                );
            }
        }
        let auth = self.auth(raw.auth.unwrap_or_default());
        let telemetry = self.telemetry(raw.telemetry.unwrap_or_default());
        let mirror = self.mirror(raw.mirror.unwrap_or_default());
        let control = self.control(raw.control.unwrap_or_default());
        let admin = self.admin(raw.admin.unwrap_or_default());
        let tls = self.tls(raw.tls.unwrap_or_default());
        let tables = self.tables(raw.tables);
        match (old, new, auth) {
            (Some(old), Some(new), Some(auth)) if self.problems.is_empty() => Ok(Config {
                proxy,
                old,
                new,
                auth,
                telemetry,
                mirror,
                control,
                admin,
                tls,
                tables,
            }),
            _ => Err(ConfigError::Invalid(self.problems)),
        }
    }

    fn proxy(&mut self, raw: RawProxy) -> ProxySettings {
        let defaults = ProxySettings::default();
        let listen = match raw.listen {
            Some(s) => self.socket_addr("proxy.listen", &s).unwrap_or(defaults.listen),
            None => defaults.listen,
        };
        let admin_listen = match raw.admin_listen.as_deref() {
            None => defaults.admin_listen,
            Some("off") => None,
            Some(s) => self
                .socket_addr("proxy.admin_listen", s)
                .or(defaults.admin_listen),
        };
        let max_connections = self.int(
            "proxy.max_connections",
            raw.max_connections,
            u64::from(defaults.max_connections),
            1,
            i64::from(u32::MAX),
        );
        let max_pending_logins = self.int(
            "proxy.max_pending_logins",
            raw.max_pending_logins,
            u64::from(defaults.max_pending_logins),
            1,
            i64::from(u32::MAX),
        );
        let max_message_bytes = self.int(
            "proxy.max_message_bytes",
            raw.max_message_bytes,
            defaults.max_message_bytes as u64,
            1024,
            MAX_MESSAGE_BYTES_LIMIT,
        );
        let connect_ms = self.int(
            "proxy.connect_timeout_ms",
            raw.connect_timeout_ms,
            defaults.connect_timeout.as_millis() as u64,
            1,
            i64::MAX,
        );
        let idle = self.int(
            "proxy.client_idle_timeout_secs",
            raw.client_idle_timeout_secs,
            defaults.client_idle_timeout.map_or(0, |d| d.as_secs()),
            0,
            i64::MAX,
        );
        let keepalive = self.int(
            "proxy.tcp_keepalive_secs",
            raw.tcp_keepalive_secs,
            defaults.tcp_keepalive.map_or(0, |d| d.as_secs()),
            0,
            MAX_KEEPALIVE_SECS,
        );
        let grace = self.int(
            "proxy.shutdown_grace_secs",
            raw.shutdown_grace_secs,
            defaults.shutdown_grace.as_secs(),
            0,
            i64::MAX,
        );
        let workers = self.int(
            "proxy.worker_threads",
            raw.worker_threads,
            defaults.worker_threads as u64,
            0,
            1024,
        );
        ProxySettings {
            listen,
            admin_listen,
            max_connections: u32::try_from(max_connections).unwrap_or(u32::MAX),
            max_pending_logins: u32::try_from(max_pending_logins).unwrap_or(u32::MAX),
            max_message_bytes: usize::try_from(max_message_bytes).unwrap_or(usize::MAX),
            connect_timeout: Duration::from_millis(connect_ms),
            client_idle_timeout: (idle > 0).then(|| Duration::from_secs(idle)),
            tcp_keepalive: (keepalive > 0).then(|| Duration::from_secs(keepalive)),
            shutdown_grace: Duration::from_secs(grace),
            worker_threads: usize::try_from(workers).unwrap_or(0),
            other_databases: self
                .choice(
                    "proxy.other_databases",
                    raw.other_databases,
                    &[
                        ("passthrough", OtherDatabases::Passthrough),
                        ("refuse", OtherDatabases::Refuse),
                    ],
                )
                .unwrap_or_default(),
        }
    }

    /// One of `choices` by its name, the first one when absent; `None` (and a problem naming
    /// every choice) for any other value.
    fn choice<T: Copy>(&mut self, key: &str, value: Option<String>, choices: &[(&str, T)]) -> Option<T> {
        let Some(value) = value else {
            return choices.first().map(|(_, c)| *c);
        };
        let found = choices.iter().find(|(name, _)| *name == value).map(|(_, c)| *c);
        if found.is_none() {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            self.problem(
                key,
                format!("unknown value {value:?}; expected one of {}", names.join(", ")),
            );
        }
        found
    }

    fn socket_addr(&mut self, key: &str, s: &str) -> Option<SocketAddr> {
        match s.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                let off = if key.ends_with("admin_listen") {
                    ", or \"off\""
                } else {
                    ""
                };
                self.problem(
                    key,
                    format!("{s:?} is not an IP address and port such as \"127.0.0.1:6432\" or \"[::1]:6432\"{off}"),
                );
                None
            }
        }
    }

    /// An integer setting within `min..=max`, or `default` when absent (or
    /// invalid, after recording the problem).
    fn int(&mut self, key: &str, value: Option<i64>, default: u64, min: i64, max: i64) -> u64 {
        match value {
            None => default,
            Some(v) if (min..=max).contains(&v) => u64::try_from(v).unwrap_or(default),
            Some(v) if max == i64::MAX => {
                self.problem(key, format!("{v} is out of range; must be at least {min}"));
                default
            }
            Some(v) => {
                self.problem(
                    key,
                    format!("{v} is out of range; must be between {min} and {max}"),
                );
                default
            }
        }
    }

    fn store(&mut self, section: &str, raw: RawStore) -> Option<StoreSettings> {
        let key = format!("{section}.url");
        match raw.url {
            None => {
                let var = format!("SWITCHYARD_{}__URL", section.to_ascii_uppercase());
                self.problem(
                    &key,
                    format!("missing; set url in [{section}] (for example \"postgres://user@127.0.0.1:5432/db\") or {var}"),
                );
                None
            }
            Some(s) => match StoreUrl::parse(&s) {
                Ok(url) => {
                    self.store_tls(&key, &url);
                    Some(StoreSettings { url })
                }
                Err(why) => {
                    self.problem(&key, why);
                    None
                }
            },
        }
    }

    /// TLS toward a PostgreSQL store (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`): what the
    /// store connections cannot honour is refused here, and the files it names must be readable.
    fn store_tls(&mut self, key: &str, url: &StoreUrl) {
        if url.engine != crate::Engine::Postgres {
            return;
        }
        match crate::StoreTls::of(url) {
            Err(why) => self.problem(key, why),
            Ok(tls) => {
                for (param, path) in tls.files() {
                    if let Err(e) = std::fs::File::open(path) {
                        self.problem(key, format!("{param} {}: cannot be read: {e}", path.display()));
                    }
                }
            }
        }
    }

    fn auth(&mut self, raw: RawAuth) -> Option<AuthSettings> {
        let method = match raw.method.as_deref() {
            None => Some(AuthMethod::default()),
            Some(s) => s
                .parse()
                .map_err(|why: String| self.problem("auth.method", why))
                .ok(),
        };
        let users_file = match raw.users_file {
            Some(s) if s.is_empty() => {
                self.problem("auth.users_file", "is empty; name a users file");
                return None;
            }
            Some(s) => Some(self.base_dir.join(s)),
            None => None,
        };
        let upstream_login = self.choice(
            "auth.upstream_login",
            raw.upstream_login,
            &[
                ("client", UpstreamLogin::Client),
                ("service", UpstreamLogin::Service),
            ],
        );
        let lookup = self.choice(
            "auth.auth_lookup",
            raw.auth_lookup,
            &[("off", false), ("old", true)],
        );
        let auth_query = match (lookup, raw.auth_query) {
            (Some(true), None) => Some(DEFAULT_AUTH_QUERY.to_owned()),
            (Some(true), Some(q)) if !q.contains("$1") => {
                self.problem(
                    "auth.auth_query",
                    "must take the user name as its parameter $1 (and return the name and the secret)",
                );
                None
            }
            (Some(true), Some(q)) => Some(q),
            (_, Some(_)) => {
                self.problem("auth.auth_query", "is set but auth_lookup is not \"old\"");
                None
            }
            (_, None) => None,
        };
        let users = match (&users_file, method) {
            (None, Some(AuthMethod::Trust)) => UsersFile::default(),
            // Every user is looked up on the store.
            (None, Some(_)) if auth_query.is_some() => UsersFile::default(),
            (None, Some(method)) => {
                self.problem(
                    "auth.users_file",
                    format!("missing; auth method {method} needs a users file, or auth_lookup = \"old\" (or set method = \"trust\")"),
                );
                return None;
            }
            // An unknown method was reported already; still check the file's format.
            (Some(path), method) => self.users(path, method.unwrap_or(AuthMethod::Trust))?,
            (None, None) => return None,
        };
        Some(AuthSettings {
            method: method?,
            users_file,
            users,
            upstream_login: upstream_login?,
            auth_query,
        })
    }

    fn users(&mut self, path: &Path, method: AuthMethod) -> Option<UsersFile> {
        match UsersFile::load(path, method) {
            Ok(users) => Some(users),
            Err(ConfigError::Invalid(problems)) => {
                self.problems.extend(problems);
                None
            }
            Err(e) => {
                self.problem("auth.users_file", e.to_string());
                None
            }
        }
    }

    fn telemetry(&mut self, raw: RawTelemetry) -> TelemetrySettings {
        let defaults = TelemetrySettings::default();
        let log_format = match raw.log_format {
            None => defaults.log_format,
            Some(s) => s
                .parse()
                .map_err(|why: String| self.problem("telemetry.log_format", why))
                .unwrap_or(defaults.log_format),
        };
        let log_level = self.non_empty("telemetry.log_level", raw.log_level, defaults.log_level);
        let service_name = self.non_empty("telemetry.service_name", raw.service_name, defaults.service_name);
        let otlp_endpoint = raw.otlp_endpoint.and_then(|s| match Url::parse(&s) {
            Ok(url) if url.scheme() == "http" && url.host().is_some() => Some(url),
            Ok(url) => {
                self.problem(
                    "telemetry.otlp_endpoint",
                    format!(
                        "{s:?} has scheme {:?}; expected an http:// URL of an OTLP/HTTP collector",
                        url.scheme()
                    ),
                );
                None
            }
            Err(e) => {
                self.problem(
                    "telemetry.otlp_endpoint",
                    format!("{s:?} is not a valid URL: {e}"),
                );
                None
            }
        });
        TelemetrySettings {
            log_format,
            log_level,
            otlp_endpoint,
            service_name,
        }
    }

    fn non_empty(&mut self, key: &str, value: Option<String>, default: String) -> String {
        match value {
            None => default,
            Some(s) if s.trim().is_empty() => {
                self.problem(key, "is empty");
                default
            }
            Some(s) => s,
        }
    }

    fn mirror(&mut self, raw: RawMirror) -> MirrorSettings {
        let d = MirrorSettings::default();
        let ms = |d: Duration| d.as_millis() as u64;
        let pool_size = self.int("mirror.pool_size", raw.pool_size, u64::from(d.pool_size), 1, 1000);
        let timeout = self.int("mirror.timeout_ms", raw.timeout_ms, ms(d.timeout), 10, 600_000);
        let repair = self.int(
            "mirror.repair_interval_ms",
            raw.repair_interval_ms,
            ms(d.repair_interval),
            10,
            3_600_000,
        );
        let stale = self.int(
            "mirror.stale_intent_secs",
            raw.stale_intent_secs,
            d.stale_intent.as_secs(),
            1,
            86_400,
        );
        let refresh = self.int(
            "mirror.function_refresh_secs",
            raw.function_refresh_secs,
            d.function_refresh.as_secs(),
            1,
            86_400,
        );
        let fault_injection = raw.fault_injection.and_then(|f| {
            f.parse()
                .map_err(|why: String| self.problem("mirror.fault_injection", why))
                .ok()
        });
        MirrorSettings {
            fault_injection,
            pool_size: u32::try_from(pool_size).unwrap_or(d.pool_size),
            timeout: Duration::from_millis(timeout),
            repair_interval: Duration::from_millis(repair),
            stale_intent: Duration::from_secs(stale),
            function_refresh: Duration::from_secs(refresh),
        }
    }

    fn control(&mut self, raw: RawControl) -> ControlSettings {
        let d = ControlSettings::default();
        let poll = self.int(
            "control.poll_interval_ms",
            raw.poll_interval_ms,
            d.poll_interval.as_millis() as u64,
            50,
            3_600_000,
        );
        let age = self.int(
            "control.max_drift_age_secs",
            raw.max_drift_age_secs,
            d.max_drift_age.as_secs(),
            1,
            30 * 86_400,
        );
        let lease = self.int(
            "control.read_lease_ms",
            raw.read_lease_ms,
            d.read_lease.as_millis() as u64,
            100,
            60_000,
        );
        let barrier = self.int(
            "control.barrier_timeout_ms",
            raw.barrier_timeout_ms,
            d.barrier_timeout.as_millis() as u64,
            100,
            600_000,
        );
        let window = self.int(
            "control.unconfigured_write_window_secs",
            raw.unconfigured_write_window_secs,
            d.unconfigured_write_window.as_secs(),
            30,
            7 * 86_400,
        );
        let max_drift_rate = match raw.max_drift_rate {
            None => d.max_drift_rate,
            Some(r) if (0.0..=1.0).contains(&r) => r,
            Some(r) => {
                self.problem(
                    "control.max_drift_rate",
                    format!("{r} is out of range; must be a share between 0 and 1 (0.001 is 0.1%)"),
                );
                d.max_drift_rate
            }
        };
        ControlSettings {
            poll_interval: Duration::from_millis(poll),
            max_drift_rate,
            max_drift_age: Duration::from_secs(age),
            read_lease: Duration::from_millis(lease),
            barrier_timeout: Duration::from_millis(barrier),
            unconfigured_write_window: Duration::from_secs(window),
        }
    }

    fn tls(&mut self, raw: RawTls) -> TlsSettings {
        let mode = match raw.mode.as_deref() {
            None | Some("disable") => TlsMode::Disable,
            Some("allow") => TlsMode::Allow,
            Some("require") => TlsMode::Require,
            Some(other) => {
                self.problem(
                    "tls.mode",
                    format!("unknown mode {other:?}; expected one of disable, allow, require"),
                );
                TlsMode::Disable
            }
        };
        let mut path = |key: &str, value: Option<String>| match value {
            Some(s) if s.trim().is_empty() => {
                self.problem(key, "is empty; name a PEM file");
                None
            }
            Some(s) => Some(self.base_dir.join(s)),
            None => None,
        };
        let cert_file = path("tls.cert_file", raw.cert_file);
        let key_file = path("tls.key_file", raw.key_file);
        let client_ca_file = path("tls.client_ca_file", raw.client_ca_file);
        if mode != TlsMode::Disable {
            for (key, file) in [("tls.cert_file", &cert_file), ("tls.key_file", &key_file)] {
                if file.is_none() {
                    self.problem(
                        key,
                        format!(
                            "missing; mode = \"{}\" needs a certificate and its key (PEM)",
                            mode.as_str()
                        ),
                    );
                }
            }
        }
        TlsSettings {
            mode,
            cert_file,
            key_file,
            client_ca_file,
        }
    }

    fn admin(&mut self, raw: RawAdmin) -> AdminSettings {
        let token = match raw.token {
            Some(t) if t.len() < 16 => {
                self.problem(
                    "admin.token",
                    "is shorter than 16 characters; use a long random token (openssl rand -hex 32)",
                );
                None
            }
            other => other,
        };
        AdminSettings { token }
    }

    fn tables(&mut self, raw: Vec<RawTable>) -> Vec<TableSettings> {
        let mut tables = Vec::with_capacity(raw.len());
        let mut seen: HashMap<TableName, usize> = HashMap::new();
        for (i, t) in raw.into_iter().enumerate() {
            let key = format!("tables[{i}]");
            let name = match t.name.as_deref().map(str::parse::<TableName>) {
                None => {
                    self.problem(&format!("{key}.name"), "missing; write name = \"schema.table\"");
                    None
                }
                Some(Err(why)) => {
                    self.problem(&format!("{key}.name"), why);
                    None
                }
                Some(Ok(name)) => {
                    if let Some(first) = seen.insert(name.clone(), i) {
                        self.problem(
                            &format!("{key}.name"),
                            format!("table {name} is already listed as tables[{first}]"),
                        );
                    }
                    Some(name)
                }
            };
            let which = name.as_ref().map_or_else(String::new, |n| format!("table {n}: "));
            let phase = match t.phase.as_deref().map(str::parse::<Phase>) {
                None => {
                    let valid = Phase::valid_names();
                    self.problem(
                        &format!("{key}.phase"),
                        format!("{which}missing; expected one of {valid}"),
                    );
                    None
                }
                Some(Err(why)) => {
                    self.problem(&format!("{key}.phase"), format!("{which}{why}"));
                    None
                }
                Some(Ok(phase)) => Some(phase),
            };
            let read_share = self.percent(&format!("{key}.read_share"), &which, t.read_share, 0);
            let shadow_share = self.percent(
                &format!("{key}.shadow_share"),
                &which,
                t.shadow_share,
                DEFAULT_SHADOW_SHARE,
            );
            let key_cols = t.key.unwrap_or_default();
            let mut key_ok = true;
            for (j, col) in key_cols.iter().enumerate() {
                if col.trim().is_empty() || col.contains('"') || col.chars().any(char::is_control) {
                    self.problem(
                        &format!("{key}.key"),
                        format!(
                            "{which}column name {col:?} is empty or contains quotes or control characters"
                        ),
                    );
                    key_ok = false;
                } else if key_cols[..j].contains(col) {
                    self.problem(
                        &format!("{key}.key"),
                        format!("{which}column {col:?} is listed twice"),
                    );
                    key_ok = false;
                }
            }
            let on_uncaptured = match t.on_uncaptured.as_deref().map(str::parse::<UncapturedPolicy>) {
                None => Some(UncapturedPolicy::default()),
                Some(Ok(p)) => Some(p),
                Some(Err(why)) => {
                    self.problem(&format!("{key}.on_uncaptured"), format!("{which}{why}"));
                    None
                }
            };
            let group = match t.group {
                Some(g) if g.trim().is_empty() || g.chars().any(char::is_control) || g.len() > 63 => {
                    self.problem(
                        &format!("{key}.group"),
                        format!("{which}a group name is 1 to 63 characters, without control characters"),
                    );
                    None
                }
                g => Some(g),
            };
            if let (
                Some(group),
                Some(name),
                Some(phase),
                Some(read_share),
                Some(shadow_share),
                Some(on_uncaptured),
                true,
            ) = (
                group,
                name,
                phase,
                read_share,
                shadow_share,
                on_uncaptured,
                key_ok,
            ) {
                tables.push(TableSettings {
                    name,
                    phase,
                    read_share,
                    shadow_share,
                    key: key_cols,
                    on_uncaptured,
                    group,
                });
            }
        }
        tables
    }
}
