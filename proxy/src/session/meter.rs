//! Statement counts and request latency for the dual-write relay.
//!
//! The passthrough relay feeds `switchyard_statements_total` and
//! `switchyard_store_latency_seconds` from its own pumps; the dual-write relay
//! (`mirror::session`) keeps one [`RequestMeter`] and calls it twice: with every client message
//! it takes, and once every answer it waited for has come. Counts are by the same rules as the
//! passthrough's (one per Query, one per Execute, by the kind of the statement).
//! Latency is from a client's request (Query, Sync, FunctionCall) to the point where the session
//! has every answer to it, the mirrored commit included; requests a client pipelines are timed
//! together, to the last answer of the batch.

use std::collections::VecDeque;
use std::time::Instant;

use switchyard_pgwire::frontend;

use super::relay::StatementKinds;
use crate::metrics::Metrics;

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
