//! The resolved sections of the configuration: `[proxy]`, `[old]`/`[new]`,
//! `[auth]` and `[telemetry]`.
//!
//! These are what programs use. Each field notes the TOML key it comes from;
//! serializing gives back those keys (with secrets redacted).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Serialize, Serializer};
use url::Url;

use crate::store_url::StoreUrl;
use crate::users::UsersFile;

/// `[proxy]`: the listening sockets and per-connection limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxySettings {
    /// `listen`: where applications connect (default `127.0.0.1:6432`).
    pub listen: SocketAddr,
    /// `admin_listen`: the HTTP admin API (default `127.0.0.1:6490`);
    /// `None` when set to `"off"`.
    #[serde(serialize_with = "ser_admin_listen")]
    pub admin_listen: Option<SocketAddr>,
    /// `max_connections`: client connections at once (default 1000); beyond
    /// that, new clients get FATAL 53300 (too_many_connections).
    pub max_connections: u32,
    /// `max_pending_logins`: connections still logging in (startup packet and password not yet
    /// through) at once (default 256); beyond that the oldest of them is closed, so idle or
    /// slow connections cannot exhaust the proxy's file descriptors.
    pub max_pending_logins: u32,
    /// `max_message_bytes`: largest wire message accepted, length field
    /// included (default 256 MiB, at least 1024, at most 1 GiB).
    pub max_message_bytes: usize,
    /// `connect_timeout_ms`: upstream connect plus login (default 5 s).
    #[serde(rename = "connect_timeout_ms", serialize_with = "ser_ms")]
    pub connect_timeout: Duration,
    /// `client_idle_timeout_secs`: close client connections idle this long
    /// outside a transaction; `None` (written 0, the default) = never.
    #[serde(rename = "client_idle_timeout_secs", serialize_with = "ser_opt_secs")]
    pub client_idle_timeout: Option<Duration>,
    /// `tcp_keepalive_secs`: TCP keepalive idle time on client and upstream
    /// sockets (default 60 s); `None` (written 0) = keepalive off.
    #[serde(rename = "tcp_keepalive_secs", serialize_with = "ser_opt_secs")]
    pub tcp_keepalive: Option<Duration>,
    /// `shutdown_grace_secs`: on SIGTERM, how long running sessions may
    /// finish before they are cut (default 30 s; 0 = cut at once).
    #[serde(rename = "shutdown_grace_secs", serialize_with = "ser_secs")]
    pub shutdown_grace: Duration,
    /// `worker_threads`: event-loop threads serving client sessions, each with its own
    /// listening socket (`SO_REUSEPORT`) and every session on one thread; 0 (the default) =
    /// one per available CPU.
    pub worker_threads: usize,
    /// `other_databases`: what a client naming a database other than the authoritative store's
    /// gets (default `passthrough`).
    pub other_databases: OtherDatabases,
}

/// `[proxy] other_databases`: clients that name another database of the same server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OtherDatabases {
    /// A plain relay to that database on the same server (host, port and TLS settings of the
    /// store's URL), with the login `[auth] upstream_login` says; nothing in it is migrated
    /// (no dual writes, no read shifting). The default.
    #[default]
    Passthrough,
    /// FATAL 3D000, as if the database did not exist.
    Refuse,
}

impl Default for ProxySettings {
    /// The documented defaults.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 6432)),
            admin_listen: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 6490))),
            max_connections: 1000,
            max_pending_logins: 256,
            max_message_bytes: 256 * 1024 * 1024,
            connect_timeout: Duration::from_millis(5000),
            client_idle_timeout: None,
            tcp_keepalive: Some(Duration::from_secs(60)),
            shutdown_grace: Duration::from_secs(30),
            worker_threads: 0,
            other_databases: OtherDatabases::Passthrough,
        }
    }
}

/// `[old]` or `[new]`: one store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreSettings {
    /// `url`: how to reach the store (serialized with the password hidden).
    pub url: StoreUrl,
}

/// How the proxy authenticates clients (`[auth] method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum AuthMethod {
    /// `trust`: no password asked.
    #[serde(rename = "trust")]
    Trust,
    /// `md5`: PostgreSQL's MD5 password challenge.
    #[serde(rename = "md5")]
    Md5,
    /// `scram-sha-256`: SCRAM-SHA-256 (RFC 7677), the default.
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

impl AuthMethod {
    /// Every method.
    pub const ALL: [AuthMethod; 3] = [AuthMethod::Trust, AuthMethod::Md5, AuthMethod::ScramSha256];

    /// The name used in configuration files, as in `pg_hba.conf`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trust => "trust",
            Self::Md5 => "md5",
            Self::ScramSha256 => "scram-sha-256",
        }
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuthMethod {
    type Err = String;

    /// Parses a method name; the error lists the valid names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown method {s:?}; expected one of trust, md5, scram-sha-256"))
    }
}

/// `[auth]`: client authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthSettings {
    /// `method` (default `scram-sha-256`).
    pub method: AuthMethod,
    /// `users_file`, resolved to an absolute path if it was relative.
    /// Required unless `method = "trust"`.
    pub users_file: Option<PathBuf>,
    /// The users read from `users_file` and checked against `method`; empty
    /// when there is no users file.
    pub users: UsersFile,
    /// `upstream_login` (default `client`): as whom sessions log in to the store.
    pub upstream_login: UpstreamLogin,
    /// `auth_lookup = "old"` with `auth_query`: the query that fetches the secret of a user the
    /// users file does not list, run on the authoritative store with its URL's login; `None`
    /// (`auth_lookup = "off"`, the default) when users come from the users file only.
    pub auth_query: Option<String>,
}

/// PgBouncer's default `auth_query`: the user's name and secret from `pg_shadow`
/// (readable by superusers only, so the URL's user must be one, or the query must call a
/// `SECURITY DEFINER` function instead).
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1";

/// `[auth] upstream_login`: as whom a session logs in to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamLogin {
    /// As the client's own role (the default): `current_user`, grants, row-level security,
    /// per-role settings and connection limits are the client's, as with a direct connection.
    /// The proxy proves it with the client's plaintext password from the users file, or with
    /// the SCRAM keys recovered from the client's own SCRAM exchange (the secret must be the
    /// role's secret on the store), or with nothing when the store does not ask (trust).
    #[default]
    Client,
    /// Every session as the user of the store's URL, whoever the client is: the proxy's users
    /// get that user's rights. For a deployment where the URL's user is an unprivileged
    /// application role.
    Service,
}

/// `[telemetry] log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    /// Parses `text` or `json`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("unknown log format {s:?}; expected text or json")),
        }
    }
}

/// `[telemetry]`: logs and OpenTelemetry export. The section is optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TelemetrySettings {
    /// `log_format` (default `text`).
    pub log_format: LogFormat,
    /// `log_level`: a `tracing_subscriber::EnvFilter` directive string,
    /// passed through unchecked (default `info`).
    pub log_level: String,
    /// `otlp_endpoint`: when set, traces and metrics are exported over
    /// OTLP/HTTP to this `http://` URL.
    #[serde(serialize_with = "ser_opt_url", skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<Url>,
    /// `service_name`: the OpenTelemetry `service.name` (default
    /// `switchyard`).
    pub service_name: String,
}

impl Default for TelemetrySettings {
    /// The documented defaults.
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_level: "info".to_string(),
            otlp_endpoint: None,
            service_name: "switchyard".to_string(),
        }
    }
}

fn ser_admin_listen<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(addr) => s.collect_str(addr),
        None => s.serialize_str("off"),
    }
}

fn ser_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ser_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn ser_opt_secs<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.map_or(0, |d| d.as_secs()))
}

fn ser_opt_url<S: Serializer>(u: &Option<Url>, s: S) -> Result<S::Ok, S::Error> {
    match u {
        Some(u) => s.collect_str(u),
        None => s.serialize_none(),
    }
}

/// `[mirror]`: how the proxy mirrors writes to NEW in `dual_write` and later phases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MirrorSettings {
    /// `pool_size`: connections to NEW shared by all sessions for mirrored writes (default 16).
    pub pool_size: u32,
    /// `timeout_ms`: longest a mirrored apply or commit on NEW may take before NEW is treated as
    /// failed for that transaction and its keys are left for repair (default 2000).
    #[serde(rename = "timeout_ms", serialize_with = "ser_ms")]
    pub timeout: Duration,
    /// `repair_interval_ms`: how often the repair loop looks for pending repairs (default 1000).
    #[serde(rename = "repair_interval_ms", serialize_with = "ser_ms")]
    pub repair_interval: Duration,
    /// `stale_intent_secs`: an intent older than this is repaired by any proxy, not only the one
    /// that wrote it (a proxy that died between the two commits leaves such intents; default 30).
    #[serde(rename = "stale_intent_secs", serialize_with = "ser_secs")]
    pub stale_intent: Duration,
    /// `function_refresh_secs`: how often the proxy re-reads OLD's functions to learn which ones
    /// write a migrated table (their calls cannot be captured; default 10). Functions created
    /// through the proxy are known at once.
    #[serde(rename = "function_refresh_secs", serialize_with = "ser_secs")]
    pub function_refresh: Duration,
    /// `fault_injection`: for crash tests only. Sessions die (drop both connections, as if the
    /// proxy process were killed) at this point of the commit sequence. Never set in production.
    pub fault_injection: Option<MirrorFault>,
}

/// A point in the commit sequence where `[mirror] fault_injection` makes a session die.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorFault {
    /// Images applied on NEW (not committed), OLD not committed.
    BeforeOldCommit,
    /// OLD committed, NEW not.
    AfterOldCommit,
    /// Both committed, the intent not yet cleaned up.
    AfterNewCommit,
}

impl FromStr for MirrorFault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "before_old_commit" => Ok(Self::BeforeOldCommit),
            "after_old_commit" => Ok(Self::AfterOldCommit),
            "after_new_commit" => Ok(Self::AfterNewCommit),
            _ => Err(format!(
                "unknown fault point {s:?}; expected before_old_commit, after_old_commit or after_new_commit"
            )),
        }
    }
}

impl Default for MirrorSettings {
    /// The documented defaults.
    fn default() -> Self {
        Self {
            pool_size: 16,
            timeout: Duration::from_millis(2000),
            repair_interval: Duration::from_millis(1000),
            stale_intent: Duration::from_secs(30),
            function_refresh: Duration::from_secs(10),
            fault_injection: None,
        }
    }
}

/// `[control]`: how proxies follow the control state (each table's phase and read share, kept in
/// the `switchyard` schema of the authoritative store) and the guard rails of phase changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlSettings {
    /// `poll_interval_ms`: how often each proxy reads the control state even without a
    /// notification (default 2000): a lost notification costs at most this long.
    #[serde(rename = "poll_interval_ms", serialize_with = "ser_ms")]
    pub poll_interval: Duration,
    /// `max_drift_rate`: the highest upper bound of the latest drift estimate that lets reads
    /// move to NEW or writes cut over (default 0.001).
    pub max_drift_rate: f64,
    /// `max_drift_age_secs`: the oldest a drift result may be for the guard rails (default
    /// 3600).
    #[serde(rename = "max_drift_age_secs", serialize_with = "ser_secs")]
    pub max_drift_age: Duration,
    /// `read_lease_ms`: how long a proxy may serve reads from NEW after its last check that no
    /// mirror failure awaits repair (default 2000; checked every half of it). A commit whose
    /// mirror failed is answered this much later, so no proxy can still serve the stale row
    /// when the client reads again (`docs/read-shift.md`).
    #[serde(rename = "read_lease_ms", serialize_with = "ser_ms")]
    pub read_lease: Duration,
    /// `barrier_timeout_ms`: how long a cutover (or rollback) waits for every proxy to confirm
    /// its barrier and for the mirrored transactions to drain before it is aborted (default
    /// 15000; a transaction held open longer than this through a proxy aborts the cutover).
    #[serde(rename = "barrier_timeout_ms", serialize_with = "ser_ms")]
    pub barrier_timeout: Duration,
    /// `unconfigured_write_window_secs`: how far back cutover looks for writes to tables that
    /// are not configured (they would be left behind on OLD; default 300).
    #[serde(rename = "unconfigured_write_window_secs", serialize_with = "ser_secs")]
    pub unconfigured_write_window: Duration,
}

impl Eq for ControlSettings {}

impl Default for ControlSettings {
    /// The documented defaults.
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(2000),
            max_drift_rate: 0.001,
            max_drift_age: Duration::from_secs(3600),
            read_lease: Duration::from_millis(2000),
            barrier_timeout: Duration::from_millis(15_000),
            unconfigured_write_window: Duration::from_secs(300),
        }
    }
}

/// `[admin]`: the admin API's actions.
#[derive(Clone, PartialEq, Eq, Default, Serialize)]
pub struct AdminSettings {
    /// `token`: the bearer token the admin API's POST actions (phase, shift) require; without
    /// one they are refused. Never printed.
    #[serde(serialize_with = "ser_secret")]
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn ser_secret<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

/// `[tls] mode`: whether clients may, or must, encrypt their connection to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// SSLRequest is answered `N`: clients go on in plain text (the default).
    #[default]
    Disable,
    /// SSLRequest is answered `S` and the handshake done; plain-text clients are served too.
    Allow,
    /// As `Allow`, and a plain-text startup is refused as a `hostssl`-only server refuses it.
    Require,
}

impl TlsMode {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Require => "require",
        }
    }
}

/// `[tls]`: TLS between clients and the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct TlsSettings {
    /// `mode` (default `disable`).
    pub mode: TlsMode,
    /// `cert_file`: the proxy's certificate chain (PEM), leaf first; needed unless disabled.
    pub cert_file: Option<PathBuf>,
    /// `key_file`: its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// `client_ca_file`: when set, clients must present a certificate signed by one of these
    /// CAs (PEM), as `clientcert=verify-ca` asks of them.
    pub client_ca_file: Option<PathBuf>,
}
