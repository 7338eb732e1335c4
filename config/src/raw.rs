//! The configuration as written: every key optional where it has a default,
//! values untyped (strings and integers), unknown keys refused.
//!
//! Keeping these loose lets validation report every bad value with its key
//! and a useful message instead of a serde type error, and keeps defaults in
//! one place ([`crate::resolve`]).

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub proxy: Option<RawProxy>,
    pub old: Option<RawStore>,
    pub new: Option<RawStore>,
    pub auth: Option<RawAuth>,
    pub telemetry: Option<RawTelemetry>,
    pub mirror: Option<RawMirror>,
    pub control: Option<RawControl>,
    pub admin: Option<RawAdmin>,
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub tables: Vec<RawTable>,
}

/// `[proxy]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub max_connections: Option<i64>,
    pub max_pending_logins: Option<i64>,
    pub max_message_bytes: Option<i64>,
    pub connect_timeout_ms: Option<i64>,
    pub client_idle_timeout_secs: Option<i64>,
    pub tcp_keepalive_secs: Option<i64>,
    pub shutdown_grace_secs: Option<i64>,
    pub worker_threads: Option<i64>,
    pub other_databases: Option<String>,
}

/// `[old]` and `[new]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub url: Option<String>,
}

/// `[auth]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
    pub method: Option<String>,
    pub users_file: Option<String>,
    pub upstream_login: Option<String>,
    pub auth_lookup: Option<String>,
    pub auth_query: Option<String>,
}

/// `[telemetry]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTelemetry {
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
}

/// `[mirror]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMirror {
    pub pool_size: Option<i64>,
    pub timeout_ms: Option<i64>,
    pub repair_interval_ms: Option<i64>,
    pub stale_intent_secs: Option<i64>,
    pub function_refresh_secs: Option<i64>,
    pub fault_injection: Option<String>,
}

/// `[control]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawControl {
    pub poll_interval_ms: Option<i64>,
    pub max_drift_rate: Option<f64>,
    pub max_drift_age_secs: Option<i64>,
    pub read_lease_ms: Option<i64>,
    pub barrier_timeout_ms: Option<i64>,
    pub unconfigured_write_window_secs: Option<i64>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub token: Option<String>,
}

/// `[tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub mode: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub client_ca_file: Option<String>,
}

/// One `[[tables]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTable {
    pub name: Option<String>,
    pub phase: Option<String>,
    pub read_share: Option<i64>,
    pub shadow_share: Option<i64>,
    pub key: Option<Vec<String>>,
    pub on_uncaptured: Option<String>,
    pub group: Option<String>,
}

/// The sections that may be set from the environment
/// (`SWITCHYARD_<SECTION>__<KEY>`). `[[tables]]` is an array and cannot.
pub(crate) const ENV_SECTIONS: &[&str] = &[
    "proxy",
    "old",
    "new",
    "auth",
    "telemetry",
    "mirror",
    "control",
    "admin",
    "tls",
];
