//! Metrics, defined through OpenTelemetry and served as Prometheus text at `/metrics`.
//!
//! Hot-path counts are plain atomics that OpenTelemetry observable instruments read at
//! collection time, so a statement costs a relaxed increment, not an attribute-set lookup.
//! Latency goes to OpenTelemetry histograms. Each proxy instance owns its own registry and
//! meter provider (no globals), so tests can run several proxies in one process.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Histogram, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::Resource;

use crate::classify::{Protocol, StatementKind};
use crate::error::{ErrorKind, ErrorSource, StartError, ERROR_KINDS};

const SOURCES: [ErrorSource; 4] = [
    ErrorSource::Client,
    ErrorSource::Old,
    ErrorSource::New,
    ErrorSource::Internal,
];

/// Counters shared by every session of one proxy instance.
#[derive(Debug, Default)]
pub struct Counters {
    connections_total: AtomicU64,
    connections_active: AtomicI64,
    statements: [[AtomicU64; StatementKind::COUNT]; 2],
    errors: [[AtomicU64; ERROR_KINDS.len()]; SOURCES.len()],
}

impl Counters {
    /// A client connection was accepted.
    pub fn connection_opened(&self) {
        self.connections_total.fetch_add(1, Relaxed);
        self.connections_active.fetch_add(1, Relaxed);
    }

    /// A client connection closed.
    pub fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }

    /// Client connections open now.
    pub fn connections_active(&self) -> i64 {
        self.connections_active.load(Relaxed)
    }

    /// Client connections accepted since start.
    pub fn connections_total(&self) -> u64 {
        self.connections_total.load(Relaxed)
    }

    /// A statement was sent to a store.
    pub fn statement(&self, protocol: Protocol, kind: StatementKind) {
        self.statements[protocol as usize][kind as usize].fetch_add(1, Relaxed);
    }

    /// Statements of one protocol and kind so far.
    pub fn statements(&self, protocol: Protocol, kind: StatementKind) -> u64 {
        self.statements[protocol as usize][kind as usize].load(Relaxed)
    }

    /// An error happened.
    pub fn error(&self, source: ErrorSource, kind: ErrorKind) {
        self.errors[source as usize][kind as usize].fetch_add(1, Relaxed);
    }

    /// Errors of one source and kind so far.
    pub fn errors(&self, source: ErrorSource, kind: ErrorKind) -> u64 {
        self.errors[source as usize][kind as usize].load(Relaxed)
    }
}

/// A proxy instance's metrics: counters, latency histograms and the exporters.
pub struct Metrics {
    /// Hot-path counters.
    pub counters: Arc<Counters>,
    old_latency: Histogram<f64>,
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("counters", &self.counters)
            .finish()
    }
}

impl Metrics {
    /// Builds the instruments and the Prometheus exporter; adds a periodic OTLP/HTTP exporter
    /// when `otlp_endpoint` is set.
    pub fn new(service_name: &str, otlp_endpoint: Option<&str>) -> Result<Metrics, StartError> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| StartError::Telemetry(e.to_string()))?;
        let mut builder = SdkMeterProvider::builder()
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_owned())
                    .build(),
            )
            .with_reader(prometheus);
        if let Some(endpoint) = otlp_endpoint {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/metrics", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| StartError::Telemetry(e.to_string()))?;
            builder = builder.with_periodic_exporter(exporter);
        }
        let provider = builder.build();
        let meter = provider.meter("switchyard");
        let counters = Arc::new(Counters::default());

        let c = Arc::clone(&counters);
        meter
            .u64_observable_counter("switchyard_connections")
            .with_description("Client connections accepted")
            .with_callback(move |o| o.observe(c.connections_total(), &[]))
            .build();
        let c = Arc::clone(&counters);
        meter
            .i64_observable_up_down_counter("switchyard_connections_active")
            .with_description("Client connections open now")
            .with_callback(move |o| o.observe(c.connections_active(), &[]))
            .build();
        let c = Arc::clone(&counters);
        meter
            .u64_observable_counter("switchyard_statements")
            .with_description("Statements forwarded, by protocol and kind")
            .with_callback(move |o| {
                for protocol in [Protocol::Simple, Protocol::Extended] {
                    for kind in StatementKind::ALL {
                        let n = c.statements(protocol, kind);
                        if n > 0 {
                            o.observe(
                                n,
                                &[
                                    KeyValue::new("protocol", protocol.as_str()),
                                    KeyValue::new("kind", kind.as_str()),
                                ],
                            );
                        }
                    }
                }
            })
            .build();
        let c = Arc::clone(&counters);
        meter
            .u64_observable_counter("switchyard_errors")
            .with_description("Errors, by source and kind")
            .with_callback(move |o| {
                for source in SOURCES {
                    for kind in ERROR_KINDS {
                        let n = c.errors(source, kind);
                        if n > 0 {
                            o.observe(
                                n,
                                &[
                                    KeyValue::new("source", source.as_str()),
                                    KeyValue::new("kind", kind.as_str()),
                                ],
                            );
                        }
                    }
                }
            })
            .build();
        let old_latency = meter
            .f64_histogram("switchyard_store_latency")
            .with_unit("s")
            .with_description("Time from a request's first message to the store's ReadyForQuery")
            .with_boundaries(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0,
            ])
            .build();
        Ok(Metrics {
            counters,
            old_latency,
            registry,
            provider,
        })
    }

    /// Records one request's round trip to the OLD store.
    pub fn old_round_trip(&self, elapsed: Duration) {
        self.old_latency
            .record(elapsed.as_secs_f64(), &[KeyValue::new("store", "old")]);
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render_prometheus(&self) -> String {
        let families = self.registry.gather();
        let mut out = String::new();
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "metrics provider shutdown");
        }
    }
}
