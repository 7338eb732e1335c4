//! SIGTERM drains gracefully, SIGINT (or a second SIGTERM) stops at once.
//!
//! SIGHUP will reload the run-time fields of the config (phase, read share) once those exist;
//! until then it is logged and ignored rather than killing the process.

use std::time::Duration;

use anyhow::Context;
use switchyard_proxy::ShutdownTrigger;
use tokio::signal::unix::{signal, SignalKind};

/// Installs the handlers and spawns the task that turns signals into shutdown stages.
pub fn spawn_handler(trigger: ShutdownTrigger, grace: Duration) -> anyhow::Result<()> {
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
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: nothing in this configuration is reloadable yet; ignored");
                }
            }
        }
    });
    Ok(())
}
