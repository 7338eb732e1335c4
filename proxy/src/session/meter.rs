//! Statement counts and request latency for the dual-write relay, and the rest of what the
//! dual-write session asks of the proxy ([`DualHost`]: the stop signal, error counts).
//!
//! The passthrough relay feeds `switchyard_statements_total` and
//! `switchyard_store_latency_seconds` from its own pumps; the dual-write relay
//! (`switchyard_dualwrite::session`) calls its host twice: with every client message it takes,
//! and once every answer it waited for has come; the host keeps one [`RequestMeter`]. Counts are by the same rules as the
//! passthrough's (one per Query, one per Execute, by the kind of the statement).
//! Latency is from a client's request (Query, Sync, FunctionCall) to the point where the session
//! has every answer to it, the mirrored commit included; requests a client pipelines are timed
//! together, to the last answer of the batch.

use std::collections::VecDeque;
use std::time::Instant;

use switchyard_pgwire::frontend;

use switchyard_dualwrite::session::{SessionHost, Stop};

use super::relay::StatementKinds;
use crate::authority::Authority;
use crate::error::{ErrorKind, ErrorSource};
use crate::metrics::Metrics;
use crate::shutdown::{Shutdown, ShutdownState};
use std::sync::Arc;

/// The proxy's side of a dual-write session: its stop signal and its metrics.
pub(crate) struct DualHost<'a> {
    shutdown: Shutdown,
    meter: RequestMeter,
    metrics: &'a Metrics,
    /// The write authority's gate, and the engine generation the session runs.
    authority: (&'a Arc<Authority>, u64),
}

impl<'a> DualHost<'a> {
    pub(crate) fn new(
        shutdown: Shutdown,
        metrics: &'a Metrics,
        authority: (&'a Arc<Authority>, u64),
    ) -> Self {
        DualHost {
            shutdown,
            meter: RequestMeter::default(),
            metrics,
            authority,
        }
    }
}

impl SessionHost for DualHost<'_> {
    fn stop(&self) -> Stop {
        match self.shutdown.state() {
            ShutdownState::Running => Stop::Run,
            ShutdownState::Draining { grace } => Stop::Drain { grace },
            ShutdownState::Immediate => Stop::Now,
        }
    }

    async fn stop_changed(&mut self) {
        let now = self.shutdown.state();
        self.shutdown.changed_from(now).await;
    }

    fn client_message(&mut self, tag: u8, body: &[u8]) {
        self.meter.client_message(tag, body, self.metrics);
    }

    fn answered(&mut self) {
        self.meter.answered(self.metrics);
    }

    fn statement_error(&mut self) {
        self.metrics
            .counters
            .error(ErrorSource::Old, ErrorKind::Statement);
    }

    async fn enter(&mut self) -> bool {
        let (authority, generation) = self.authority;
        authority.enter(generation).await
    }

    fn quiet(&mut self) {
        self.authority.0.quiet();
    }
}

/// What the dual-write relay tells the metrics.
#[derive(Default)]
pub(crate) struct RequestMeter {
    kinds: StatementKinds,
    /// When each client request still unanswered was sent.
    started: VecDeque<Instant>,
}

impl RequestMeter {
    /// A message from the client (`tag`, `body` without the header): counts statements and
    /// starts the clock of a request. A malformed message is left to the server to refuse.
    pub(crate) fn client_message(&mut self, tag: u8, body: &[u8], metrics: &Metrics) {
        if matches!(tag, b'Q' | b'S' | b'F') {
            self.started.push_back(Instant::now());
        }
        if matches!(tag, b'Q' | b'P' | b'B' | b'E' | b'C') {
            if let Ok(msg) = frontend::parse(tag, body) {
                self.kinds.note(&msg, metrics);
            }
        }
    }

    /// Every request sent so far is answered: records their latency.
    pub(crate) fn answered(&mut self, metrics: &Metrics) {
        for started in self.started.drain(..) {
            metrics.old_round_trip(started.elapsed());
        }
    }
}
