//! SIGTERM drains gracefully, SIGINT (or a second SIGTERM) stops at once, SIGHUP reloads.
//!
//! On SIGHUP the configuration file is read and validated again. What may change at run time
//! (`Config::hot_changes`: the users in the users file, `telemetry.log_level`) is applied; every
//! other change is logged as waiting for a restart. A file that does not load is logged as an
//! error and the proxy goes on with the configuration it has.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchyard_config::Config;
use switchyard_proxy::ShutdownTrigger;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::telemetry::TelemetryGuard;

/// What SIGHUP reloads: the file, the configuration running now, and where changes go.
pub struct Reload {
    /// The configuration file the proxy was started with.
    pub file: PathBuf,
    /// The log filter.
    pub telemetry: Arc<TelemetryGuard>,
    /// The proxy's end of reloads (`switchyard_proxy::run_with_reload`).
    pub proxy: watch::Sender<Arc<Config>>,
}

/// Installs the handlers and spawns the task that turns signals into shutdown stages and
/// reloads.
pub fn spawn_handler(trigger: ShutdownTrigger, grace: Duration, reload: Reload) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    if matches!(trigger.state(), switchyard_proxy::ShutdownState::Running) {
                        tracing::info!(grace_secs = grace.as_secs(), "SIGTERM: draining");
                        trigger.drain(grace);
                    } else {
                        tracing::info!("second SIGTERM: stopping now");
                        trigger.immediate();
                    }
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: stopping now");
                    trigger.immediate();
                }
                _ = hup.recv() => reload.run(),
            }
        }
    });
    Ok(())
}

impl Reload {
    /// Reads the file again and applies what may change at run time.
    fn run(&self) {
        let file = self.file.display().to_string();
        let newer = match Config::load(&self.file) {
            Ok(newer) => newer,
            Err(e) => {
                tracing::error!(file, error = %e, "SIGHUP: configuration not reloaded; running on with the one loaded before");
                return;
            }
        };
        let running = Arc::clone(&self.proxy.borrow());
        let restart = running.changes_needing_restart(&newer);
        if !restart.is_empty() {
            tracing::warn!(
                file,
                keys = %restart.join(", "),
                "SIGHUP: these changes apply only when the proxy restarts; not applied"
            );
        }
        let mut hot = running.hot_changes(&newer);
        // Certificate files are read again on every reload: a certificate renewed in place
        // changes no key of the file.
        if newer.tls.mode != switchyard_config::TlsMode::Disable && !hot.contains(&"tls") {
            hot.push("tls (certificate files)");
        }
        if hot.is_empty() {
            tracing::info!(file, "SIGHUP: nothing to apply at run time");
            return;
        }
        if hot.contains(&"telemetry.log_level") {
            match self.telemetry.set_log_level(&newer.telemetry.log_level) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("SIGHUP: RUST_LOG is set and keeps precedence over telemetry.log_level")
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: telemetry.log_level not applied"),
            }
        }
        self.proxy
            .send_replace(Arc::new(running.with_hot_fields_of(&newer)));
        tracing::info!(file, keys = %hot.join(", "), "SIGHUP: configuration reloaded");
    }
}
