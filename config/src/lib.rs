//! Typed, validated configuration shared by every Switchyard program.
//!
//! A TOML file (see `config/switchyard.example.toml`) plus environment
//! overrides named `SWITCHYARD_<SECTION>__<KEY>` (for example
//! `SWITCHYARD_OLD__URL`, `SWITCHYARD_PROXY__LISTEN`) are read, checked, and
//! resolved into a [`Config`] of typed values: socket addresses, parsed store
//! URLs, enums, durations, and the users from `[auth] users_file`.
//!
//! Unknown keys are errors, in the file, in the users file and in
//! `SWITCHYARD_<SECTION>__<KEY>` variables. Variables without `__`
//! (`SWITCHYARD_CONFIG`, `SWITCHYARD_LOG`, ...) belong to the programs and are
//! ignored here. `[[tables]]` cannot be set from the environment.
//!
//! There is no global configuration: programs load a `Config` and pass it
//! down. On reload they load a new one and apply what may change at run time
//! ([`Config::hot_changes`]); the rest waits for a restart
//! ([`Config::changes_needing_restart`]). Defaults are written once, in the
//! settings' `Default` implementations, which validation falls back to.

mod env;
mod error;
mod raw;
mod resolve;
mod settings;
mod store_tls;
mod store_url;
mod tables;
mod users;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use error::{ConfigError, Problem};
pub use settings::{
    AdminSettings, AuthMethod, AuthSettings, ControlSettings, LogFormat, MirrorFault, MirrorSettings,
    OtherDatabases, ProxySettings, StoreSettings, TelemetrySettings, TlsMode, TlsSettings, UpstreamLogin,
    DEFAULT_AUTH_QUERY,
};
pub use store_tls::{SslMode, StoreTls};
pub use store_url::{Engine, RedactedStoreUrl, StoreUrl};
pub use tables::{Phase, TableName, TableSettings, UncapturedPolicy, DEFAULT_GROUP, DEFAULT_SHADOW_SHARE};
pub use url::Url;
pub use users::{UserCredential, UserEntry, UsersFile};

/// The prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "SWITCHYARD_";

/// The whole configuration, resolved and validated.
///
/// `Debug` and `Serialize` never show passwords or secrets; serializing
/// gives the file's keys, suitable for `check-config` and `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// `[proxy]`: listeners and limits.
    pub proxy: ProxySettings,
    /// `[old]`: the store being migrated from.
    pub old: StoreSettings,
    /// `[new]`: the store being migrated to.
    pub new: StoreSettings,
    /// `[auth]`: client authentication and the users allowed in.
    pub auth: AuthSettings,
    /// `[telemetry]`: logging and OpenTelemetry export.
    pub telemetry: TelemetrySettings,
    /// `[mirror]`: the dual-write engine's connections, deadlines and repair loop.
    pub mirror: MirrorSettings,
    /// `[control]`: how proxies follow the shared control state, and the guard rails.
    pub control: ControlSettings,
    /// `[admin]`: the admin API's actions.
    pub admin: AdminSettings,
    /// `[tls]`: TLS toward clients (reloaded on SIGHUP, certificates included).
    pub tls: TlsSettings,
    /// `[[tables]]`: the tables being migrated, in file order, names unique.
    pub tables: Vec<TableSettings>,
}

impl Config {
    /// Whether `[[tables]]` names more than one table group: then write authority moves one
    /// group at a time, and each transaction runs where its group's writes are.
    pub fn has_groups(&self) -> bool {
        self.tables
            .first()
            .is_some_and(|first| self.tables.iter().any(|t| t.group() != first.group()))
    }

    /// Loads `path` with overrides from the process environment; a relative
    /// `users_file` is resolved against the current directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (env, problems) = env::process_env();
        Self::load_inner(path, env, None, problems)
    }

    /// Loads `path` with overrides taken from `env` instead of the process
    /// environment (variable name -> value); a relative `users_file` is
    /// resolved against the current directory.
    pub fn load_with_env(path: &Path, env: HashMap<String, String>) -> Result<Config, ConfigError> {
        Self::load_inner(path, env, None, Vec::new())
    }

    /// As [`load_with_env`](Self::load_with_env), resolving a relative
    /// `users_file` against `base_dir`.
    pub fn load_with_env_in(
        path: &Path,
        env: HashMap<String, String>,
        base_dir: &Path,
    ) -> Result<Config, ConfigError> {
        Self::load_inner(path, env, Some(base_dir), Vec::new())
    }

    /// Parses configuration text with overrides from `env`; a relative
    /// `users_file` is resolved against the current directory.
    pub fn from_toml_str(text: &str, env: HashMap<String, String>) -> Result<Config, ConfigError> {
        let base = current_dir()?;
        Self::parse(text, "<string>", env, &base, Vec::new())
    }

    /// As [`from_toml_str`](Self::from_toml_str), resolving a relative
    /// `users_file` against `base_dir`.
    pub fn from_toml_str_in(
        text: &str,
        env: HashMap<String, String>,
        base_dir: &Path,
    ) -> Result<Config, ConfigError> {
        Self::parse(text, "<string>", env, base_dir, Vec::new())
    }

    /// Reads `auth.users_file` again and validates it against `auth.method`
    /// (for reloading users without reloading everything). With no users
    /// file, returns an empty list.
    pub fn load_users(&self) -> Result<UsersFile, ConfigError> {
        match &self.auth.users_file {
            Some(path) => UsersFile::load(path, self.auth.method),
            None => Ok(UsersFile::default()),
        }
    }

    /// The settings for `name`, if that table is listed.
    pub fn table(&self, name: &TableName) -> Option<&TableSettings> {
        self.tables.iter().find(|t| &t.name == name)
    }

    /// The keys whose values differ between `self` and `newer` and that a running proxy takes
    /// on reload (SIGHUP): the users (the content of the users file), `telemetry.log_level`
    /// and `[tls]` (whose certificate files are read again on every reload, changed or not).
    pub fn hot_changes(&self, newer: &Config) -> Vec<&'static str> {
        let checks: [(&'static str, bool); 3] = [
            ("auth.users", self.auth.users != newer.auth.users),
            ("tls", self.tls != newer.tls),
            (
                "telemetry.log_level",
                self.telemetry.log_level != newer.telemetry.log_level,
            ),
        ];
        checks
            .into_iter()
            .filter_map(|(key, changed)| changed.then_some(key))
            .collect()
    }

    /// The keys whose values differ between `self` and `newer` and that only take effect at
    /// start: everything but what [`hot_changes`](Self::hot_changes) lists. That includes
    /// `[[tables]]`: the dual-write engine is set up for its tables at start.
    pub fn changes_needing_restart(&self, newer: &Config) -> Vec<&'static str> {
        let mut telemetry = newer.telemetry.clone();
        telemetry.log_level.clone_from(&self.telemetry.log_level);
        let checks: [(&'static str, bool); 12] = [
            ("proxy", self.proxy != newer.proxy),
            ("old", self.old != newer.old),
            ("new", self.new != newer.new),
            ("auth.method", self.auth.method != newer.auth.method),
            ("auth.users_file", self.auth.users_file != newer.auth.users_file),
            (
                "auth.upstream_login",
                self.auth.upstream_login != newer.auth.upstream_login,
            ),
            ("auth.auth_query", self.auth.auth_query != newer.auth.auth_query),
            ("telemetry", self.telemetry != telemetry),
            ("mirror", self.mirror != newer.mirror),
            ("control", self.control != newer.control),
            ("admin", self.admin != newer.admin),
            ("tables", self.tables != newer.tables),
        ];
        checks
            .into_iter()
            .filter_map(|(key, changed)| changed.then_some(key))
            .collect()
    }

    /// `self` with the fields [`hot_changes`](Self::hot_changes) covers taken from `newer`:
    /// the configuration a proxy runs with after a reload.
    pub fn with_hot_fields_of(&self, newer: &Config) -> Config {
        let mut running = self.clone();
        running.auth.users = newer.auth.users.clone();
        running.tls = newer.tls.clone();
        running.telemetry.log_level.clone_from(&newer.telemetry.log_level);
        running
    }

    fn load_inner(
        path: &Path,
        env: HashMap<String, String>,
        base_dir: Option<&Path>,
        earlier: Vec<Problem>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            what: "config file",
            path: path.to_path_buf(),
            source,
        })?;
        let base = match base_dir {
            Some(dir) => dir.to_path_buf(),
            None => current_dir()?,
        };
        Self::parse(&text, &path.display().to_string(), env, &base, earlier)
    }

    fn parse(
        text: &str,
        origin: &str,
        env: HashMap<String, String>,
        base_dir: &Path,
        mut earlier: Vec<Problem>,
    ) -> Result<Config, ConfigError> {
        // The file alone is checked strictly by `toml` (types, unknown keys,
        // with line numbers); the `config` crate then merges the environment,
        // whose values are all strings and are converted leniently.
        let from_file: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: error::toml_error_line(text, &e),
        })?;
        let overrides = env::select_overrides(env);
        earlier.extend(overrides.problems);
        if overrides.vars.is_empty() {
            return resolve::Resolver::new(&overrides.keys, base_dir).resolve(from_file, earlier);
        }
        let merged = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
                    .prefix_separator("_")
                    .separator("__")
                    .source(Some(overrides.vars.into_iter().collect())),
            )
            .build()
            .and_then(|c| c.try_deserialize::<raw::RawConfig>());
        let raw = match merged {
            Ok(raw) => raw,
            // The file was fine on its own, so the environment is at fault.
            Err(e) if earlier.is_empty() => {
                let message = e.to_string();
                return Err(ConfigError::Parse {
                    origin: env::blame(&overrides.keys, &message),
                    message,
                });
            }
            // Bad variable names explain most failures here; report those.
            Err(_) => return Err(ConfigError::Invalid(earlier)),
        };
        resolve::Resolver::new(&overrides.keys, base_dir).resolve(raw, earlier)
    }
}

fn current_dir() -> Result<PathBuf, ConfigError> {
    std::env::current_dir().map_err(|source| ConfigError::Read {
        what: "current directory",
        path: PathBuf::from("."),
        source,
    })
}
