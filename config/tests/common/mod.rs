//! Helpers shared by the config tests: scratch directories and a minimal
//! valid configuration. Tests never read or change the process environment.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use switchyard_config::{Config, ConfigError};

/// A directory under the system temp dir, removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("switchyard-config-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    /// Writes `text` to `name` inside the directory and returns the path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The smallest valid configuration: two stores, trust auth.
pub const MINIMAL: &str = r#"
[old]
url = "postgres://u@127.0.0.1:5432/old_db"
[new]
url = "postgres://u@127.0.0.1:5432/new_db"
[auth]
method = "trust"
"#;

/// No environment overrides.
pub fn no_env() -> HashMap<String, String> {
    HashMap::new()
}

/// An environment from pairs.
pub fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parses `text` with no environment; panics with the error on failure.
pub fn parse(text: &str) -> Config {
    match Config::from_toml_str(text, no_env()) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

/// Parses `text` relative to `base` with `env`, expecting failure; returns
/// the error's Display.
pub fn error_in(text: &str, env: HashMap<String, String>, base: &Path) -> String {
    match Config::from_toml_str_in(text, env, base) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// Parses `text` with no environment, expecting failure; returns the
/// error's Display.
pub fn error(text: &str) -> String {
    error_in(text, no_env(), Path::new("."))
}

/// Parses `text` expecting failure; returns the error itself.
pub fn error_value(text: &str) -> ConfigError {
    Config::from_toml_str(text, no_env()).unwrap_err()
}

/// Asserts that `haystack` contains every needle.
#[track_caller]
pub fn assert_mentions(haystack: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            haystack.contains(needle),
            "expected {needle:?} in error:\n{haystack}"
        );
    }
}
