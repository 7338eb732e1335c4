//! Staged shutdown: stop accepting, let sessions finish until a deadline, then close the rest.
//!
//! SIGTERM asks for a drain (sessions end at their next idle point, outside any transaction);
//! SIGINT, or a second SIGTERM, or the drain deadline, closes every session at once.

use std::time::Duration;

use tokio::sync::watch;

/// The shutdown stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownState {
    /// Serving.
    Running,
    /// No new connections; sessions close when idle; force-close after the grace period.
    Draining {
        /// How long sessions may still finish their transactions.
        grace: Duration,
    },
    /// Close everything now.
    Immediate,
}

/// The sending side, held by whoever decides to stop (signal handler, tests).
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    tx: watch::Sender<ShutdownState>,
}

/// The receiving side, cloned into the accept loop and every session.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<ShutdownState>,
}

/// A new trigger and its first receiver.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(ShutdownState::Running);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    /// Starts a graceful drain; a drain already under way keeps its deadline.
    pub fn drain(&self, grace: Duration) {
        self.tx.send_if_modified(|s| match s {
            ShutdownState::Running => {
                *s = ShutdownState::Draining { grace };
                true
            }
            _ => false,
        });
    }

    /// Closes everything now.
    pub fn immediate(&self) {
        self.tx.send_replace(ShutdownState::Immediate);
    }

    /// The current stage.
    pub fn state(&self) -> ShutdownState {
        *self.tx.borrow()
    }
}

impl Shutdown {
    /// The current stage.
    pub fn state(&self) -> ShutdownState {
        *self.rx.borrow()
    }

    /// Waits until the stage differs from `Running` (or from `Draining` when `past_drain`).
    /// Also returns when the trigger is dropped, which counts as [`ShutdownState::Immediate`].
    pub async fn changed_from(&mut self, current: ShutdownState) -> ShutdownState {
        loop {
            let now = *self.rx.borrow_and_update();
            if now != current {
                return now;
            }
            if self.rx.changed().await.is_err() {
                return ShutdownState::Immediate;
            }
        }
    }
}
