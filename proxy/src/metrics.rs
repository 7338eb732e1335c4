//! Metrics, defined through OpenTelemetry and served as Prometheus text at `/metrics`.
//!
//! Hot-path counts are plain atomics that OpenTelemetry observable instruments read at
//! collection time, so a statement costs a relaxed increment, not an attribute-set lookup.
//! Latency goes to an OpenTelemetry histogram when metrics are pushed over OTLP; otherwise to
//! [`LatencyHistogram`], lock-free buckets rendered into the same Prometheus text (an SDK
//! histogram record hashes its attribute set under a lock: about a tenth of the proxy's CPU per
//! request). Each proxy instance owns its own registry and meter provider (no globals), so tests
//! can run several proxies in one process.

use std::collections::HashMap;
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

/// The dual-write engines running now: none, one, or two while table groups are split between
/// the stores (one per store taking some group's writes). They change when write authority moves.
pub type CurrentMirrors = Arc<dyn Fn() -> Vec<Arc<switchyard_dualwrite::Mirror>> + Send + Sync>;

/// The label naming a dual-write engine by the store whose writes it mirrors to the other:
/// `from="old"` before cutover, `from="new"` after (reverse mirroring), both while table groups
/// are split between the stores.
fn from(m: &switchyard_dualwrite::Mirror) -> KeyValue {
    KeyValue::new("from", m.roles.authoritative.as_str())
}

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

/// Name, description and bucket bounds (seconds) of the store latency histogram.
const LATENCY_NAME: &str = "switchyard_store_latency";
const LATENCY_HELP: &str = "Time from a request's first message to the store's ReadyForQuery";
const LATENCY_BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Where request latencies are recorded.
enum Latency {
    /// Lock-free buckets, rendered into the Prometheus registry.
    Native(Arc<LatencyHistogram>),
    /// The OpenTelemetry SDK histogram, which the OTLP exporter reads.
    Otel(Histogram<f64>),
}

/// A proxy instance's metrics: counters, latency histograms and the exporters.
pub struct Metrics {
    /// Hot-path counters.
    pub counters: Arc<Counters>,
    old_latency: Latency,
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
        Metrics::build(service_name, otlp_endpoint, otlp_endpoint.is_none())
    }

    /// `native_latency`: record latency in [`LatencyHistogram`] rather than the SDK histogram.
    fn build(
        service_name: &str,
        otlp_endpoint: Option<&str>,
        native_latency: bool,
    ) -> Result<Metrics, StartError> {
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
        let old_latency = if native_latency {
            let histogram = Arc::new(LatencyHistogram::default());
            let collector = LatencyCollector::new(Arc::clone(&histogram))
                .map_err(|e| StartError::Telemetry(e.to_string()))?;
            registry
                .register(Box::new(collector))
                .map_err(|e| StartError::Telemetry(e.to_string()))?;
            Latency::Native(histogram)
        } else {
            Latency::Otel(
                meter
                    .f64_histogram(LATENCY_NAME)
                    .with_unit("s")
                    .with_description(LATENCY_HELP)
                    .with_boundaries(LATENCY_BOUNDS.to_vec())
                    .build(),
            )
        };
        Ok(Metrics {
            counters,
            old_latency,
            registry,
            provider,
        })
    }

    /// Records one request's round trip to the OLD store.
    pub fn old_round_trip(&self, elapsed: Duration) {
        match &self.old_latency {
            Latency::Native(h) => h.record(elapsed.as_secs_f64()),
            Latency::Otel(h) => h.record(elapsed.as_secs_f64(), &[KeyValue::new("store", "old")]),
        }
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

    /// Adds the dual-write engines' instruments, read from the engines running when they are
    /// observed (`current`; a cutover replaces them, and their counters start again from zero,
    /// which Prometheus counts as a counter reset): mirrored transactions, failures, repairs,
    /// pending intents and mirror latency, each labelled `from` (the store the engine mirrors
    /// from), shadow reads and reads served per store (per table: each table is one engine's).
    pub fn register_engine(&self, current: CurrentMirrors) {
        self.register_mirror(&current);
        self.register_shadow(&current);
        self.register_read_shift(&current);
    }

    fn register_mirror(&self, current: &CurrentMirrors) {
        let meter = self.provider.meter("switchyard");
        let counter =
            |name: &'static str, help: &'static str, read: fn(&switchyard_dualwrite::MirrorStats) -> u64| {
                let m = Arc::clone(current);
                meter
                    .u64_observable_counter(name)
                    .with_description(help)
                    .with_callback(move |o| {
                        for m in m() {
                            o.observe(read(&m.stats), &[from(&m)]);
                        }
                    })
                    .build();
            };
        counter(
            "switchyard_mirrored_transactions",
            "Transactions whose row images NEW committed",
            |s| s.mirrored.load(Relaxed),
        );
        counter(
            "switchyard_mirror_failures",
            "Transactions committed on OLD whose NEW side failed (left for repair)",
            |s| s.mirror_failures.load(Relaxed),
        );
        counter(
            "switchyard_repairs",
            "Intents repaired by re-copying their keys from OLD",
            |s| s.repairs.load(Relaxed),
        );
        counter(
            "switchyard_repair_failures",
            "Repair rounds that failed and were retried",
            |s| s.repair_failures.load(Relaxed),
        );
        counter(
            "switchyard_uncaptured_writes",
            "Writes on migrated tables that could not be captured (refused or marked for verification)",
            |s| s.uncaptured.load(Relaxed),
        );
        let m = Arc::clone(current);
        meter
            .i64_observable_gauge("switchyard_repairs_pending")
            .with_description("Intents on OLD not yet confirmed on NEW (pending repairs included)")
            .with_callback(move |o| {
                for m in m() {
                    o.observe(m.stats.pending_intents.load(Relaxed), &[from(&m)]);
                }
            })
            .build();
        let m = Arc::clone(current);
        meter
            .f64_observable_gauge("switchyard_mirror_latency_mean_seconds")
            .with_description("Mean time from applying row images on NEW to NEW's commit")
            .with_callback(move |o| {
                for m in m() {
                    let s = &m.stats;
                    let n = s.latency_count.load(Relaxed);
                    if n > 0 {
                        o.observe(
                            s.latency_us_sum.load(Relaxed) as f64 / n as f64 / 1e6,
                            &[from(&m)],
                        );
                    }
                }
            })
            .build();
        let m = Arc::clone(current);
        meter
            .f64_observable_gauge("switchyard_mirror_latency_seconds")
            .with_description(
                "Quantiles of the time from applying row images on NEW to NEW's commit, since start",
            )
            .with_callback(move |o| {
                for m in m() {
                    for (q, label) in [(0.5, "0.5"), (0.99, "0.99")] {
                        if let Some(ms) = m.stats.latency.quantile_ms(q) {
                            o.observe(ms / 1000.0, &[KeyValue::new("quantile", label), from(&m)]);
                        }
                    }
                }
            })
            .build();
    }

    /// Shadow reads per table in phase `shadow_read` and outcome:
    /// `switchyard_shadow_reads_total{table,outcome}` (`match`, `mismatch`, `error`, `skipped`).
    fn register_shadow(&self, current: &CurrentMirrors) {
        use switchyard_dualwrite::shadow::ShadowOutcome;
        let m = Arc::clone(current);
        self.provider
            .meter("switchyard")
            .u64_observable_counter("switchyard_shadow_reads")
            .with_description("Reads also run on NEW and compared with OLD's answer, by outcome")
            .with_callback(move |o| {
                for m in m() {
                    let Some(shadow) = &m.shadow else { continue };
                    for (i, name) in shadow.tables() {
                        let Some(stats) = shadow.table(i) else { continue };
                        for outcome in ShadowOutcome::ALL {
                            o.observe(
                                stats.count(outcome),
                                &[
                                    KeyValue::new("table", name.to_owned()),
                                    KeyValue::new("outcome", outcome.as_str()),
                                ],
                            );
                        }
                    }
                }
            })
            .build();
    }

    /// Reads of tables in phase `read_shift`, by the store that served them:
    /// `switchyard_reads_total{table,store}` (`old`, `new`), and those NEW was to serve that
    /// OLD served instead: `switchyard_read_fallbacks_total{table,reason}` (`error`,
    /// `unavailable`, `too_large`, `types`, `login`); `switchyard_read_lease_held` (1 while this proxy
    /// may serve reads from NEW).
    fn register_read_shift(&self, current: &CurrentMirrors) {
        use switchyard_dualwrite::shift::Fallback;
        let meter = self.provider.meter("switchyard");
        let m = Arc::clone(current);
        meter
            .u64_observable_counter("switchyard_reads")
            .with_description("Eligible reads of tables in read_shift, by the store that served them")
            .with_callback(move |o| {
                for m in m() {
                    for (name, counts) in m.shift.tables() {
                        for (store, n) in [("old", &counts.old), ("new", &counts.new)] {
                            o.observe(
                                n.load(Relaxed),
                                &[
                                    KeyValue::new("table", name.clone()),
                                    KeyValue::new("store", store),
                                ],
                            );
                        }
                    }
                }
            })
            .build();
        let m = Arc::clone(current);
        meter
            .u64_observable_counter("switchyard_read_fallbacks")
            .with_description("Reads NEW was to serve that OLD served instead, by reason")
            .with_callback(move |o| {
                for m in m() {
                    for (name, counts) in m.shift.tables() {
                        for reason in Fallback::ALL {
                            o.observe(
                                counts.fallbacks(reason),
                                &[
                                    KeyValue::new("table", name.clone()),
                                    KeyValue::new("reason", reason.as_str()),
                                ],
                            );
                        }
                    }
                }
            })
            .build();
        let m = Arc::clone(current);
        meter
            .u64_observable_gauge("switchyard_read_lease_held")
            .with_description("1 while this proxy holds the read lease (may serve reads from NEW)")
            .with_callback(move |o| {
                // Reads move to NEW only while OLD takes the writes: OLD's engine holds the lease.
                if let Some(m) = m()
                    .iter()
                    .find(|m| m.roles.authoritative == switchyard_store::Role::Old)
                {
                    o.observe(u64::from(m.shift.lease_held()), &[]);
                }
            })
            .build();
    }

    /// How long this proxy last held new transactions for a cutover barrier:
    /// `switchyard_cutover_pause_seconds` (0 before any).
    pub(crate) fn register_authority(&self, authority: Arc<crate::authority::Authority>) {
        self.provider
            .meter("switchyard")
            .f64_observable_gauge("switchyard_cutover_pause_seconds")
            .with_description("How long new transactions last waited for a cutover barrier in this proxy")
            .with_callback(move |o| o.observe(authority.last_pause_us.load(Relaxed) as f64 / 1e6, &[]))
            .build();
    }

    /// The latest drift figures per configured table: `switchyard_drift_rate{table,bound}`
    /// (`bound`: `estimate`, `low`, `high` of the 95% interval; a verify's are all its exact
    /// rate) and `switchyard_drift_age_seconds{table}`, from the most recent result of either
    /// kind. A table without any result has no series.
    pub(crate) fn register_drift(
        &self,
        figures: Arc<crate::drift_figures::DriftFigures>,
        tables: Vec<String>,
    ) {
        use crate::drift_figures::DriftFigures;
        let meter = self.provider.meter("switchyard");
        let (f, names) = (Arc::clone(&figures), tables.clone());
        meter
            .f64_observable_gauge("switchyard_drift_rate")
            .with_description("Share of keys that differ between OLD and NEW, from the latest drift result")
            .with_callback(move |o| {
                let now = f.now();
                for t in &names {
                    if let Some(r) = DriftFigures::newest(&now, t) {
                        for (bound, v) in [("estimate", r.rate), ("low", r.ci95_low), ("high", r.ci95_high)] {
                            o.observe(
                                v,
                                &[KeyValue::new("table", t.clone()), KeyValue::new("bound", bound)],
                            );
                        }
                    }
                }
            })
            .build();
        meter
            .f64_observable_gauge("switchyard_drift_age_seconds")
            .with_description("Age of the latest drift result")
            .with_callback(move |o| {
                let now = figures.now();
                for t in &tables {
                    if let Some(r) = DriftFigures::newest(&now, t) {
                        o.observe(r.age_seconds, &[KeyValue::new("table", t.clone())]);
                    }
                }
            })
            .build();
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "metrics provider shutdown");
        }
    }
}

/// Cumulative latency buckets for one store, updated with relaxed atomics.
///
/// Buckets are upper-inclusive, as in the SDK and in Prometheus (`le`); the last one is +Inf.
/// The count is the sum of the buckets, so the two always agree in a scrape.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    /// Sum of the recorded seconds, as `f64` bits.
    sum: AtomicU64,
}

impl LatencyHistogram {
    /// Records one latency in seconds; NaN and infinities are ignored, as the SDK does.
    pub fn record(&self, secs: f64) {
        if !secs.is_finite() {
            return;
        }
        let i = LATENCY_BOUNDS.partition_point(|&b| b < secs);
        self.buckets[i].fetch_add(1, Relaxed);
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + secs).to_bits())
        });
    }
}

/// Renders a [`LatencyHistogram`] as the family the OpenTelemetry Prometheus exporter would:
/// same name (unit suffix included), help, `store` label and buckets; absent until a first
/// latency is recorded.
struct LatencyCollector {
    histogram: Arc<LatencyHistogram>,
    desc: prometheus::core::Desc,
}

impl LatencyCollector {
    fn new(histogram: Arc<LatencyHistogram>) -> prometheus::Result<LatencyCollector> {
        let desc = prometheus::core::Desc::new(
            format!("{LATENCY_NAME}_seconds"),
            LATENCY_HELP.to_owned(),
            Vec::new(),
            HashMap::from([("store".to_owned(), "old".to_owned())]),
        )?;
        Ok(LatencyCollector { histogram, desc })
    }
}

impl prometheus::core::Collector for LatencyCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto;
        let mut buckets = Vec::with_capacity(LATENCY_BOUNDS.len());
        let mut count = 0;
        for (bound, n) in LATENCY_BOUNDS.iter().zip(&self.histogram.buckets) {
            count += n.load(Relaxed);
            let mut b = proto::Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(count);
            buckets.push(b);
        }
        count += self.histogram.buckets[LATENCY_BOUNDS.len()].load(Relaxed);
        if count == 0 {
            return Vec::new();
        }
        let mut h = proto::Histogram::default();
        h.set_sample_sum(f64::from_bits(self.histogram.sum.load(Relaxed)));
        h.set_sample_count(count);
        h.set_bucket(buckets);
        let mut m = proto::Metric::default();
        m.set_label(self.desc.const_label_pairs.clone());
        m.set_histogram(h);
        let mut family = proto::MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        family.set_metric(vec![m]);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency_lines(metrics: &Metrics) -> Vec<String> {
        metrics
            .render_prometheus()
            .lines()
            .filter(|l| l.contains(LATENCY_NAME))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn native_latency_renders_like_the_sdk_histogram() {
        let native = Metrics::build("t", None, true).unwrap();
        let sdk = Metrics::build("t", None, false).unwrap();
        assert!(latency_lines(&native).is_empty());
        assert!(latency_lines(&sdk).is_empty());
        // On a bound, between bounds, below the first, above the last.
        for us in [100, 250, 300, 7, 12_000_000, 1_000, 999, 0, 42_000] {
            native.old_round_trip(Duration::from_micros(us));
            sdk.old_round_trip(Duration::from_micros(us));
        }
        let lines = latency_lines(&native);
        assert_eq!(lines, latency_lines(&sdk));
        assert!(
            lines
                .iter()
                .any(|l| l
                    .starts_with("switchyard_store_latency_seconds_bucket{store=\"old\",le=\"0.0001\"} 3")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l == "switchyard_store_latency_seconds_count{store=\"old\"} 9"),
            "{lines:#?}"
        );
        native.shutdown();
        sdk.shutdown();
    }
}
