//! `--max-rows-per-sec`: one budget shared by every worker of the process.
//!
//! A worker reserves a chunk's worth of rows before leasing a chunk; reservations are spaced so
//! that, over time, no more than the limit is read. After the chunk the worker settles the
//! difference between what it reserved and what it read.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// A rows-per-second limiter shared by the workers.
#[derive(Debug)]
pub struct Throttle {
    rate: Option<f64>,
    next: Mutex<Instant>,
}

impl Throttle {
    /// `rows_per_sec` = None or 0: no limit.
    pub fn new(rows_per_sec: Option<u64>) -> Throttle {
        Throttle {
            rate: rows_per_sec.filter(|r| *r > 0).map(|r| r as f64),
            next: Mutex::new(Instant::now()),
        }
    }

    /// When a worker may start reading `rows` rows (now, without a limit).
    pub async fn reserve(&self, rows: u64) -> Instant {
        let now = Instant::now();
        let Some(rate) = self.rate else {
            return now;
        };
        let mut next = self.next.lock().await;
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(rows as f64 / rate);
        start
    }

    /// Corrects a reservation of `reserved` rows that read `actual`.
    pub async fn settle(&self, reserved: u64, actual: u64) {
        let Some(rate) = self.rate else {
            return;
        };
        let mut next = self.next.lock().await;
        if actual > reserved {
            *next += Duration::from_secs_f64((actual - reserved) as f64 / rate);
        } else {
            let back = Duration::from_secs_f64((reserved - actual) as f64 / rate);
            let floor = Instant::now();
            *next = next.checked_sub(back).unwrap_or(floor).max(floor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_are_spaced_by_the_rate() {
        let t = Throttle::new(Some(1000));
        let a = t.reserve(500).await;
        let b = t.reserve(500).await;
        let c = t.reserve(1000).await;
        assert_eq!(b - a, Duration::from_millis(500));
        assert_eq!(c - b, Duration::from_millis(500));
        let free = Throttle::new(None);
        let now = Instant::now();
        assert!(free.reserve(1_000_000).await <= now + Duration::from_millis(1));
    }
}
