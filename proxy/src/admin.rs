//! The admin HTTP API: `/health`, `/status` (JSON), `/metrics` (Prometheus text).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

use crate::shutdown::{Shutdown, ShutdownState};
use crate::state::ProxyState;

const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the admin API until an immediate shutdown. During a drain it keeps answering (health
/// says 503 "draining", so load balancers stop sending clients); `run` stops it once every
/// session has ended.
pub(crate) async fn serve(state: Arc<ProxyState>, listener: TcpListener, mut shutdown: Shutdown) {
    let app = Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state);
    let stop = async move {
        let mut state = shutdown.state();
        while state != ShutdownState::Immediate {
            state = shutdown.changed_from(state).await;
        }
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
        tracing::warn!(error = %e, "admin API stopped");
    }
}

/// 200 when the authoritative store (OLD, in every phase built so far) answers, 503 otherwise.
async fn health(State(state): State<Arc<ProxyState>>) -> impl IntoResponse {
    let (old, new) = tokio::join!(
        state.old_store.ping(PING_TIMEOUT),
        state.new_store.ping(PING_TIMEOUT)
    );
    let draining = state.shutdown.state() != ShutdownState::Running;
    let report = |r: &Result<Duration, switchyard_store::StoreError>| match r {
        Ok(d) => json!({"ok": true, "latency_ms": d.as_secs_f64() * 1000.0}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    let healthy = old.is_ok() && !draining;
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if healthy { "ok" } else if draining { "draining" } else { "degraded" },
        "old": report(&old),
        "new": report(&new),
    });
    (code, Json(body))
}

async fn status(State(state): State<Arc<ProxyState>>) -> impl IntoResponse {
    let counters = &state.metrics.counters;
    let config = &state.config;
    let drift = state.drift.now();
    let tables: Vec<_> = config
        .tables
        .iter()
        .map(|t| {
            let name = t.name.to_string();
            let mirrored = state
                .mirror
                .as_ref()
                .and_then(|m| m.tables.iter().find(|mt| mt.name == t.name));
            // Why the table's mirror waits for OLD and NEW to match again, if it does.
            let held = state
                .mirror
                .as_ref()
                .and_then(|m| m.held(m.table_index(&t.name.to_string())?));
            // Counts by outcome and recent examples, for a table in `shadow_read`.
            let shadow_reads = state.mirror.as_ref().and_then(|m| {
                let stats = m.shadow.as_ref()?.table(m.table_index(&name)?)?;
                Some(stats.to_json())
            });
            json!({
                "name": t.name.to_string(),
                "phase": t.phase.as_str(),
                "read_share": t.read_share,
                "shadow_share": t.shadow_share,
                "shadow_reads": shadow_reads,
                "mirrored": mirrored.is_some(),
                "key": mirrored.map(|m| m.key.clone()),
                "on_uncaptured": t.on_uncaptured.as_str(),
                "mirror_held": held,
                "drift": {
                    "sample": drift.iter().find(|r| r.table == name && r.kind == "sample"),
                    "verify": drift.iter().find(|r| r.table == name && r.kind == "verify"),
                },
            })
        })
        .collect();
    let mirror = state.mirror.as_ref().map(|m| {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &m.stats;
        let n = s.latency_count.load(Relaxed);
        json!({
            "new_available": m.follower_available(),
            "mirrored_transactions": s.mirrored.load(Relaxed),
            "mirror_failures": s.mirror_failures.load(Relaxed),
            "repairs": s.repairs.load(Relaxed),
            "repair_failures": s.repair_failures.load(Relaxed),
            "pending_repairs": s.pending_intents.load(Relaxed),
            "uncaptured_writes": s.uncaptured.load(Relaxed),
            "mirror_latency_ms": {
                "mean": if n > 0 { s.latency_us_sum.load(Relaxed) as f64 / n as f64 / 1000.0 } else { 0.0 },
                "max": s.latency_us_max.load(Relaxed) as f64 / 1000.0,
            },
        })
    });
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "state": match state.shutdown.state() {
            ShutdownState::Running => "running",
            ShutdownState::Draining { .. } => "draining",
            ShutdownState::Immediate => "stopping",
        },
        "listen": config.proxy.listen.to_string(),
        "old": config.old.url.redacted().to_string(),
        "new": config.new.url.redacted().to_string(),
        "auth_method": config.auth.method.as_str(),
        "connections": {
            "active": counters.connections_active(),
            "total": counters.connections_total(),
            "max": config.proxy.max_connections,
            "logging_in": state.logins.len(),
            "max_logging_in": config.proxy.max_pending_logins,
            "fd_limit": state.fd_limit,
        },
        "tables": tables,
        "mirror": mirror,
    }))
}

async fn metrics(State(state): State<Arc<ProxyState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render_prometheus(),
    )
}
