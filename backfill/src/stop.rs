//! Stopping a backfill: gracefully (finish the chunks in flight, lease no more) or at once (roll
//! the chunks in flight back). Either way the state on NEW stays consistent: a chunk's rows and
//! its `done` mark commit together or not at all.

use tokio::sync::watch;

/// How far a stop has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopLevel {
    /// Keep going.
    Running,
    /// Finish the chunks in flight, then stop.
    Graceful,
    /// Roll the chunks in flight back and stop now.
    Immediate,
}

/// Asks a running backfill to stop (the signal handler holds one).
#[derive(Debug, Clone)]
pub struct StopTrigger(watch::Sender<StopLevel>);

/// What the backfill watches.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<StopLevel>);

/// A trigger and the receiver it drives.
pub fn stop_channel() -> (StopTrigger, Stop) {
    let (tx, rx) = watch::channel(StopLevel::Running);
    (StopTrigger(tx), Stop(rx))
}

impl StopTrigger {
    /// Finish the chunks in flight, lease no more.
    pub fn graceful(&self) {
        self.raise(StopLevel::Graceful);
    }

    /// Roll back the chunks in flight and stop.
    pub fn immediate(&self) {
        self.raise(StopLevel::Immediate);
    }

    /// The level reached so far.
    pub fn level(&self) -> StopLevel {
        *self.0.borrow()
    }

    fn raise(&self, level: StopLevel) {
        self.0.send_if_modified(|current| {
            if level > *current {
                *current = level;
                true
            } else {
                false
            }
        });
    }
}

impl Stop {
    /// The level reached so far.
    pub fn level(&self) -> StopLevel {
        *self.0.borrow()
    }

    /// Whether any stop was asked for.
    pub fn stopping(&self) -> bool {
        self.level() > StopLevel::Running
    }

    /// Resolves once the level reaches `level` (never, if the trigger is dropped first).
    pub async fn reached(&mut self, level: StopLevel) {
        if self.0.wait_for(|l| *l >= level).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Sleeps `d`, or less when a stop is asked for.
    pub async fn sleep(&mut self, d: std::time::Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.reached(StopLevel::Graceful) => {}
        }
    }
}
