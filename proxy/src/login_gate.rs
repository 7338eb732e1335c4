//! A bound on the connections still logging in, shedding the oldest.
//!
//! A connection holds a file descriptor from `accept` on; one that never sends a startup packet
//! (or stops in the middle of the password exchange) would hold it for the whole authentication
//! timeout. Without a bound, a few thousand such sockets exhaust the descriptors and `accept`
//! fails for everyone. Each connection enters the gate when accepted and leaves it once
//! authenticated (or gone); when more than `max_pending_logins` are inside, the oldest is told
//! to give up. Oldest first: a slowloris keeps its sockets open as long as it can, so the
//! oldest pending login is the likeliest attacker, and an honest client logging in takes
//! milliseconds, far from the front of the queue.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// The connections logging in, oldest first. Shared by every worker thread.
#[derive(Debug)]
pub(crate) struct LoginGate {
    capacity: usize,
    pending: Mutex<VecDeque<(u64, Arc<Notify>)>>,
}

/// One connection's place in the gate; leaving it (drop) frees the place.
#[derive(Debug)]
pub(crate) struct LoginTicket {
    gate: Arc<LoginGate>,
    id: u64,
    shed: Arc<Notify>,
}

impl LoginGate {
    pub(crate) fn new(capacity: u32) -> Arc<LoginGate> {
        Arc::new(LoginGate {
            capacity: capacity.max(1) as usize,
            pending: Mutex::new(VecDeque::new()),
        })
    }

    /// Enters connection `id`; if that makes too many, the oldest one is told to give up.
    pub(crate) fn enter(self: &Arc<Self>, id: u64) -> LoginTicket {
        let shed = Arc::new(Notify::new());
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.push_back((id, Arc::clone(&shed)));
        while pending.len() > self.capacity {
            if let Some((_, oldest)) = pending.pop_front() {
                // Stores a permit if the login is not waiting yet: it gives up at its next poll.
                oldest.notify_one();
            }
        }
        LoginTicket {
            gate: Arc::clone(self),
            id,
            shed,
        }
    }

    /// Connections logging in now.
    pub(crate) fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl LoginTicket {
    /// Resolves when this login must give up to make room for newer ones.
    pub(crate) async fn shed(&self) {
        self.shed.notified().await;
    }
}

impl Drop for LoginTicket {
    fn drop(&mut self) {
        let mut pending = self.gate.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = pending.iter().position(|(id, _)| *id == self.id) {
            pending.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn shed(t: &LoginTicket) -> bool {
        tokio::time::timeout(Duration::from_millis(20), t.shed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn the_oldest_logins_are_shed_first_and_leaving_frees_a_place() {
        let gate = LoginGate::new(2);
        let first = gate.enter(1);
        let second = gate.enter(2);
        assert_eq!(gate.len(), 2);
        let third = gate.enter(3);
        assert_eq!(gate.len(), 2);
        assert!(shed(&first).await, "the oldest is shed");
        assert!(!shed(&second).await && !shed(&third).await, "the others stay");
        drop(first);
        drop(second);
        assert_eq!(gate.len(), 1, "leaving frees the place");
        let _fourth = gate.enter(4);
        assert!(!shed(&third).await, "room again: nobody is shed");
    }
}
