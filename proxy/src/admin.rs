//! The admin HTTP API: `/health`, `/status` (JSON), `/metrics` (Prometheus text), and two
//! actions, `POST /phase` and `POST /shift`, which change the control state as `switchyard
//! phase` and `switchyard shift` do; they are refused unless `[admin] token` is configured and
//! presented (`Authorization: Bearer <token>`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
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
        .route("/", get(page))
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/phase", post(phase))
        .route("/shift", post(shift))
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
    let history = state.drift.history();
    let backfill = state.drift.backfill();
    let control = state.control.state();
    let engine = state.engine();
    let tables: Vec<_> = config
        .tables
        .iter()
        .map(|t| {
            let name = t.name.to_string();
            let mirrored = engine
                .mirror
                .as_ref()
                .and_then(|m| m.tables.iter().find(|mt| mt.name == t.name));
            // Why the table's mirror waits for OLD and NEW to match again, if it does.
            let held = engine
                .mirror
                .as_ref()
                .and_then(|m| m.held(m.table_index(&t.name.to_string())?));
            // The control state, once seeded, says the phase; the file only seeds it.
            let controlled = control.as_ref().and_then(|c| c.table(&name));
            let phase = controlled.map_or(t.phase, |c| c.phase);
            let read_share = controlled.map_or(t.read_share, |c| c.read_share);
            let table_backfill = backfill.iter().find(|b| b.progress.table == name);
            let refusals = state.drift.refusals(&name);
            let cutover_refusals = state.drift.cutover_refusals(&name);
            let next = next_step(
                &name,
                phase,
                read_share,
                table_backfill.map(|b| b.progress.status.as_str()),
                refusals.as_deref(),
            );
            // Counts by outcome and recent examples, for a table in `shadow_read`.
            let shadow_reads = engine.mirror.as_ref().and_then(|m| {
                let stats = m.shadow.as_ref()?.table(m.table_index(&name)?)?;
                Some(stats.to_json())
            });
            // Reads served per store, for a table in `read_shift`.
            let reads = engine.mirror.as_ref().and_then(|m| {
                let (_, c) = m.shift.tables().find(|(n, _)| *n == name)?;
                Some(json!({
                    "old": c.old.load(std::sync::atomic::Ordering::Relaxed),
                    "new": c.new.load(std::sync::atomic::Ordering::Relaxed),
                    "fallbacks": switchyard_dualwrite::shift::Fallback::ALL
                        .iter()
                        .map(|f| (f.as_str().to_owned(), json!(c.fallbacks(*f))))
                        .collect::<serde_json::Map<_, _>>(),
                    "lease_held": m.shift.lease_held(),
                }))
            });
            json!({
                "name": t.name.to_string(),
                "phase": phase.as_str(),
                "read_share": read_share,
                "reads": reads,
                "shadow_share": t.shadow_share,
                "shadow_reads": shadow_reads,
                "phase_from": if controlled.is_some() { "control" } else { "config" },
                "control_epoch": controlled.map(|c| c.epoch),
                "mirrored": mirrored.is_some(),
                "key": mirrored.map(|m| m.key.clone()),
                "on_uncaptured": t.on_uncaptured.as_str(),
                "mirror_held": held,
                "drift": {
                    "sample": drift.iter().find(|r| r.table == name && r.kind == "sample"),
                    "verify": drift.iter().find(|r| r.table == name && r.kind == "verify"),
                    "history": history.iter().filter(|h| h.table == name).collect::<Vec<_>>(),
                },
                "backfill": table_backfill,
                "guard_rails": {
                    "checked": refusals.is_some(),
                    "pass": refusals.as_ref().is_some_and(Vec::is_empty),
                    "refusals": refusals.unwrap_or_default(),
                    // Entering cutover: the same rails, and no unconfigured table written lately.
                    "cutover_refusals": cutover_refusals.unwrap_or_default(),
                },
                "next": {"action": next.0, "command": next.1},
            })
        })
        .collect();
    let mirror = engine.mirror.as_deref().map(mirror_status);
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
        "upstream_login": config.auth.upstream_login,
        "connections": {
            "active": counters.connections_active(),
            "total": counters.connections_total(),
            "max": config.proxy.max_connections,
            "logging_in": state.logins.len(),
            "max_logging_in": config.proxy.max_pending_logins,
            "fd_limit": state.fd_limit,
        },
        "control": {
            "epoch": control.as_ref().map(|c| c.epoch),
            "read_seconds_ago": state.control.age(),
            "barrier": control.as_ref().and_then(|c| c.barrier.clone()),
        },
        "authority": {
            "writes_to": engine.roles.authoritative.name(),
            // Table groups split between the stores: the other store takes some groups' writes
            // (each with the tables it takes), and sessions run their transactions there too.
            // Each with its dual-write engine's figures (`mirror` below is the home store's).
            "stores": engine.shape.0.iter().map(|(role, mirrored)| serde_json::json!({
                "store": role.name(),
                "mirrored_tables": mirrored,
                "mirror": engine.mirrors().find(|m| m.roles.authoritative == *role).map(|m| mirror_status(m)),
            })).collect::<Vec<_>>(),
            "generation": engine.generation,
            "proxy_id": state.authority.proxy_id,
            "held_for_barrier": state.authority.closed_for(),
            "busy_sessions": state.authority.busy(),
            "last_pause_seconds": state.authority.last_pause_us.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6,
        },
        "tables": tables,
        "mirror": mirror,
    }))
}

/// One dual-write engine's figures in `/status`.
fn mirror_status(m: &switchyard_dualwrite::Mirror) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &m.stats;
    let n = s.latency_count.load(Relaxed);
    json!({
        "from": m.roles.authoritative.name(),
        "to": m.roles.follower.name(),
        // The store it mirrors to (NEW before cutover; OLD after, under its old name).
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
            "p50": s.latency.quantile_ms(0.5),
            "p99": s.latency.quantile_ms(0.99),
        },
    })
}

#[derive(Debug, serde::Deserialize)]
struct PhaseParams {
    table: String,
    to: String,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, serde::Deserialize)]
struct ShiftParams {
    table: String,
    reads: u8,
    #[serde(default)]
    force: bool,
}

/// `POST /phase?table=schema.table&to=PHASE[&force=true]`.
async fn phase(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
    Query(p): Query<PhaseParams>,
) -> impl IntoResponse {
    match p.to.parse() {
        Ok(to) => {
            act(
                &state,
                &headers,
                &p.table,
                switchyard_control::Target::Phase(to),
                p.force,
            )
            .await
        }
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"error": e}))),
    }
}

/// `POST /shift?table=schema.table&reads=PERCENT[&force=true]`.
async fn shift(
    State(state): State<Arc<ProxyState>>,
    headers: HeaderMap,
    Query(p): Query<ShiftParams>,
) -> impl IntoResponse {
    act(
        &state,
        &headers,
        &p.table,
        switchyard_control::Target::ReadShare(p.reads),
        p.force,
    )
    .await
}

/// Checks the token, then makes the change as the CLI does.
async fn act(
    state: &ProxyState,
    headers: &HeaderMap,
    table: &str,
    target: switchyard_control::Target,
    force: bool,
) -> (StatusCode, Json<serde_json::Value>) {
    let error = |code: StatusCode, message: String| (code, Json(json!({"error": message})));
    let Some(token) = state.config.admin.token.as_deref() else {
        return error(
            StatusCode::FORBIDDEN,
            "the admin API's actions are off: set [admin] token to allow them".to_owned(),
        );
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|p| same_secret(p.as_bytes(), token.as_bytes())) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token (Authorization: Bearer <[admin] token>)".to_owned(),
        );
    }
    let name: switchyard_config::TableName = match table.parse() {
        Ok(t) if state.config.tables.iter().any(|c| c.name == t) => t,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("table {table} is not in the configuration's [[tables]]"),
            )
        }
    };
    let by = format!("admin API (proxy pid {})", std::process::id());
    let request = switchyard_control::Request {
        table: &name,
        target,
        by: &by,
        force,
    };
    let authoritative = &state.old_store;
    let seeded = switchyard_control::seed(authoritative, &state.config, &by).await;
    if let Err(e) = seeded {
        return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    let result =
        switchyard_control::switch::apply(authoritative, &state.new_store, &state.config, &request).await;
    match result {
        Ok(changed) => (StatusCode::OK, Json(json!(changed))),
        Err(switchyard_control::ControlError::Refused { table, reasons }) => (
            StatusCode::CONFLICT,
            Json(json!({"table": table, "refused": reasons})),
        ),
        Err(switchyard_control::ControlError::NotAllowed { table, reason }) => (
            StatusCode::CONFLICT,
            Json(json!({"table": table, "refused": [reason]})),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The status page: one self-contained HTML file (no external scripts, fonts or styles) that
/// reads `/status` and refreshes itself.
async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("page.html"),
    )
}

/// What the operator can do next with a table, and the exact command (CONFIG is their file).
fn next_step(
    table: &str,
    phase: switchyard_config::Phase,
    read_share: u8,
    backfill: Option<&str>,
    refusals: Option<&[String]>,
) -> (String, String) {
    use switchyard_config::Phase::*;
    let cmd = |rest: &str| format!("switchyard {rest} --config CONFIG --table {table}");
    let guards_pass = refusals.is_some_and(<[String]>::is_empty);
    match phase {
        Passthrough => (
            "start dual writes: set phase = \"dual_write\" in [[tables]], prepare, restart the proxies"
                .to_owned(),
            "switchyard prepare --config CONFIG".to_owned(),
        ),
        DualWrite | ShadowRead if backfill != Some("done") => {
            ("copy the rows that existed before".to_owned(), cmd("backfill"))
        }
        DualWrite | ShadowRead | ReadShift if !guards_pass => (
            "measure the drift exactly (the guard rails refuse until they pass)".to_owned(),
            cmd("drift verify"),
        ),
        DualWrite => (
            "compare reads on NEW (optional)".to_owned(),
            format!("{} --to shadow_read", cmd("phase")),
        ),
        ShadowRead => (
            "move to read shifting".to_owned(),
            format!("{} --to read_shift", cmd("phase")),
        ),
        ReadShift if read_share < 100 => {
            let next = match read_share {
                0..=9 => 10,
                10..=49 => 50,
                _ => 100,
            };
            (
                format!("serve {next}% of reads from NEW"),
                format!("{} --reads {next}", cmd("shift")),
            )
        }
        ReadShift => (
            "cut over: NEW takes the writes, every configured table together (rollback stays possible)"
                .to_owned(),
            format!("{} --to cutover", cmd("phase")),
        ),
        Cutover => (
            format!(
                "finish: OLD is no longer written, no way back (or roll back: {} --to read_shift)",
                cmd("phase")
            ),
            format!("{} --to done", cmd("phase")),
        ),
        Done => (
            "remove Switchyard's objects from both stores".to_owned(),
            "switchyard cleanup --config CONFIG".to_owned(),
        ),
    }
}

async fn metrics(State(state): State<Arc<ProxyState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render_prometheus(),
    )
}

#[cfg(test)]
mod tests {
    use super::next_step;
    use switchyard_config::Phase;

    #[test]
    fn the_next_step_follows_the_journey() {
        let t = "public.kv";
        let pass: &[String] = &[];
        let refused = ["the backfill has not run".to_owned()];
        assert_eq!(
            next_step(t, Phase::Passthrough, 0, None, None).1,
            "switchyard prepare --config CONFIG"
        );
        assert_eq!(
            next_step(t, Phase::DualWrite, 0, None, Some(&refused)).1,
            "switchyard backfill --config CONFIG --table public.kv"
        );
        assert_eq!(
            next_step(t, Phase::DualWrite, 0, Some("done"), Some(&refused)).1,
            "switchyard drift verify --config CONFIG --table public.kv"
        );
        assert_eq!(
            next_step(t, Phase::DualWrite, 0, Some("done"), Some(pass)).1,
            "switchyard phase --config CONFIG --table public.kv --to shadow_read"
        );
        assert_eq!(
            next_step(t, Phase::ReadShift, 10, Some("done"), Some(pass)).1,
            "switchyard shift --config CONFIG --table public.kv --reads 50"
        );
        assert!(next_step(t, Phase::ReadShift, 100, Some("done"), Some(pass))
            .1
            .ends_with("--to cutover"));
        let (what, command) = next_step(t, Phase::Cutover, 100, Some("done"), Some(pass));
        assert!(
            command.ends_with("--to done") && what.contains("--to read_shift"),
            "{what}"
        );
        assert_eq!(
            next_step(t, Phase::Done, 100, Some("done"), Some(pass)).1,
            "switchyard cleanup --config CONFIG"
        );
    }
}
