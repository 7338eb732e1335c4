//! Logs (text or JSON) and, when `telemetry.otlp_endpoint` is set, OTLP/HTTP trace export.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use switchyard_config::{LogFormat, TelemetrySettings};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Flushes the trace exporter when dropped; changes the log level on reload.
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    filter: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` set the filter: it wins over `telemetry.log_level`, on reload too.
    from_env: bool,
}

impl TelemetryGuard {
    /// Replaces the log filter with `log_level` (a reloaded `telemetry.log_level`). Returns
    /// `Ok(false)` when `RUST_LOG` is set, which keeps precedence.
    pub fn set_log_level(&self, log_level: &str) -> anyhow::Result<bool> {
        if self.from_env {
            return Ok(false);
        }
        self.filter.reload(EnvFilter::try_new(log_level)?)?;
        Ok(true)
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `telemetry.log_level`.
pub fn init(settings: &TelemetrySettings) -> anyhow::Result<TelemetryGuard> {
    let (filter, from_env) = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => (EnvFilter::try_new(directive)?, true),
        _ => (EnvFilter::try_new(&settings.log_level)?, false),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = match settings.log_format {
        // A line when a span closes: one per session at info, one per statement at debug, with
        // the span's fields and its busy/idle time.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_events(FmtSpan::CLOSE)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_span_events(FmtSpan::CLOSE)
            .boxed(),
    };
    let mut tracer = None;
    let otel = match &settings.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.as_str().trim_end_matches('/')))
                .build()?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(settings.service_name.clone())
                        .build(),
                )
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("switchyard"));
            tracer = Some(provider);
            Some(layer)
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(TelemetryGuard {
        tracer,
        filter: handle,
        from_env,
    })
}
