//! The guard rails of a phase change: what must hold before reads move to NEW or writes cut
//! over, each refusal with its reason and what to do about it.
//!
//! [`refusals`] is a pure function of the facts gathered from the stores ([`Facts`]) and the
//! thresholds (`[control]`), so every rule is unit-tested here; [`gather`] reads the facts.
//! Entering `cutover` has one more rail ([`cutover_refusals`]): no table outside the
//! configuration written on the authoritative store within `unconfigured_write_window_secs`
//! (it would be left behind; see `switchyard_store::table_writes`).

use std::time::Duration;

use serde::Serialize;
use switchyard_config::{Config, ControlSettings};
use switchyard_drift::{wilson, LatestDrift};
use switchyard_store::backfill_state::BackfillProgress;
use switchyard_store::table_writes::UnconfiguredWrites;
use switchyard_store::{Store, StoreError};

/// What the guard rails look at for one table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Facts {
    /// The table's backfill status on NEW (`running`, `done`), `None` when it never ran.
    pub backfill: Option<String>,
    /// The most recent drift result of either kind (a clean verify counts as an exact
    /// estimate).
    pub drift: Option<LatestDrift>,
    /// Intents on the authoritative store older than the mirror's deadline: writes whose mirror
    /// failed and that wait for their repair.
    pub pending_repairs: i64,
    /// Whether an uncaptured write marked the table for a full verify.
    pub marked_for_verify: bool,
    /// Tables outside the configuration written recently on the authoritative store (for
    /// cutover); `None` when not read.
    pub unconfigured_writes: Option<UnconfiguredWrites>,
    /// Live proxies with sessions relaying plainly (started before dual writes), and how many.
    pub plain_sessions: Vec<(String, i64)>,
}

/// Why entering `cutover` may not happen now: every rail of [`refusals`], and
/// [`unconfigured_refusals`].
pub fn cutover_refusals(facts: &Facts, settings: &ControlSettings) -> Vec<String> {
    let mut out = refusals(facts, settings);
    out.extend(unconfigured_refusals(facts.unconfigured_writes.as_ref()));
    out
}

/// Cutover moves only the configured tables: refused while a table that is not configured was
/// written within the window (one refusal per table, with its writes), and while the window has
/// not been observed (no write-counter snapshot that old yet; `None` counts as never observed).
pub fn unconfigured_refusals(writes: Option<&UnconfiguredWrites>) -> Vec<String> {
    const HOW: &str =
        "keep a proxy running (it records the authoritative store's write counters every 30 s), \
                       or override with --force";
    let Some(w) = writes else {
        return vec![format!(
            "writes to tables that are not configured have not been observed yet: no write-counter snapshot \
             exists on the authoritative store; {HOW}"
        )];
    };
    let window = Duration::from_secs_f64(w.window_secs.max(0.0));
    let Some(observed) = w.observed_secs else {
        return vec![format!(
            "writes to tables that are not configured have not been observed yet (unconfigured_write_window_secs \
             {}): no write-counter snapshot exists on the authoritative store; {HOW}",
            window.as_secs()
        )];
    };
    let observed = Duration::from_secs_f64(observed.max(0.0));
    let mut out: Vec<String> = w
        .tables
        .iter()
        .map(|t| {
            format!(
                "table {} is not configured but was written in the last {} ({} rows inserted, updated or deleted): \
                 it would be left behind; add it to [[tables]] (and prepare and backfill it) or stop writing it",
                t.table,
                human(observed),
                t.writes
            )
        })
        .collect();
    if observed < window {
        out.push(format!(
            "writes to tables that are not configured have been observed for only {} of the {} window \
             (unconfigured_write_window_secs); wait {} more: {HOW}",
            human(observed),
            human(window),
            human(window.saturating_sub(observed))
        ));
    }
    out
}

/// Why the change may not happen now; empty when every guard rail passes.
pub fn refusals(facts: &Facts, settings: &ControlSettings) -> Vec<String> {
    let mut out = Vec::new();
    match facts.backfill.as_deref() {
        Some("done") => {}
        Some(status) => out.push(format!(
            "the backfill is not complete (status {status}); let `switchyard backfill` finish"
        )),
        None => out.push("the backfill has not run; run `switchyard backfill`".to_owned()),
    }
    let max = settings.max_drift_rate;
    match &facts.drift {
        None => out.push(format!(
            "no drift result is recorded; run `switchyard drift sample --samples {}` or `switchyard drift verify`",
            keys_for_bound(max)
        )),
        Some(d) => {
            let max_age = settings.max_drift_age;
            if d.age_seconds > max_age.as_secs_f64() {
                out.push(format!(
                    "the latest drift result ({}) is {} old, older than max_drift_age_secs ({}); measure again",
                    d.kind,
                    human(Duration::from_secs_f64(d.age_seconds.max(0.0))),
                    max_age.as_secs()
                ));
            }
            if d.differing > 0 {
                out.push(format!(
                    "the latest drift result ({}) found {} differing keys (upper bound {:.5} > max_drift_rate {max}); \
                     run `switchyard drift repair`, then verify again",
                    d.kind, d.differing, d.ci95_high
                ));
            } else if d.ci95_high > max {
                let needed = keys_for_bound(max);
                out.push(format!(
                    "the latest drift sample compared {} keys, none differing, but its upper bound {:.5} is above \
                     max_drift_rate {max}: a clean sample needs about {needed} keys ({} more); \
                     run `switchyard drift sample --samples {needed}`",
                    d.sampled,
                    d.ci95_high,
                    needed.saturating_sub(u64::try_from(d.sampled).unwrap_or(0))
                ));
            }
        }
    }
    if facts.pending_repairs > 0 {
        out.push(format!(
            "{} repairs are pending (writes whose mirror failed); wait for the proxies' repair loop to apply them",
            facts.pending_repairs
        ));
    }
    if !facts.plain_sessions.is_empty() {
        let total: i64 = facts.plain_sessions.iter().map(|(_, n)| n).sum();
        let proxies: Vec<String> = facts
            .plain_sessions
            .iter()
            .map(|(p, n)| format!("{p} ({n})"))
            .collect();
        let sessions = if total == 1 {
            "1 session relays"
        } else {
            &format!("{total} sessions relay")
        };
        out.push(format!(
            "{sessions} plainly since before dual writes started (proxies {}): their writes reach NEW \
             only through the repair loop, so a read served by NEW could miss them, and a cutover would wait for \
             them; have the application reconnect (a pool's maximum lifetime does it)",
            proxies.join(", ")
        ));
    }
    if facts.marked_for_verify {
        out.push(
            "the table is marked for a full verify (a write the proxy could not capture ran on it); \
             run `switchyard drift verify`"
                .to_owned(),
        );
    }
    out
}

/// The fewest keys a sample with no differing key needs for its 95% upper bound to fall to
/// `max` or below (about 3,840 for 0.001).
pub fn keys_for_bound(max: f64) -> u64 {
    if max <= 0.0 {
        return u64::MAX;
    }
    // Wilson's upper bound for 0 of n is z^2 / (n + z^2): solve for n, then step to the first n
    // that passes (rounding).
    let z2 = 1.959_963_984_540_054_f64.powi(2);
    let mut n = ((z2 * (1.0 - max)) / max).floor().max(1.0) as u64;
    while wilson(0, n).1 > max {
        n += 1;
    }
    n
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

/// The facts of `table` (`schema.table`) from what was read of every table: the backfill
/// progress and the latest drift results on NEW, and what [`authoritative_facts`] read.
pub fn facts(
    table: &str,
    backfill: &[BackfillProgress],
    latest: &[LatestDrift],
    authoritative: &AuthoritativeFacts,
) -> Facts {
    Facts {
        backfill: backfill
            .iter()
            .find(|p| p.table == table)
            .map(|p| p.status.clone()),
        drift: latest
            .iter()
            .filter(|r| r.table == table)
            .min_by(|a, b| a.age_seconds.total_cmp(&b.age_seconds))
            .cloned(),
        pending_repairs: authoritative.pending_repairs,
        marked_for_verify: authoritative.marked_for_verify.iter().any(|t| t == table),
        unconfigured_writes: authoritative.unconfigured_writes.clone(),
        plain_sessions: authoritative.plain_sessions.clone(),
    }
}

/// What the guard rails read on the authoritative store, for every table at once.
#[derive(Debug, Clone, Default)]
pub struct AuthoritativeFacts {
    /// Intents older than the mirror's deadline (the count is the same for every table: an
    /// intent may name several).
    pub pending_repairs: i64,
    /// The tables marked for a full verify.
    pub marked_for_verify: Vec<String>,
    /// Tables outside the configuration written recently ([`unconfigured_writes`]); `None`
    /// when not read.
    pub unconfigured_writes: Option<UnconfiguredWrites>,
    /// Live proxies with sessions relaying plainly ([`crate::barrier::plain_sessions`]).
    pub plain_sessions: Vec<(String, i64)>,
}

/// The tables of `authoritative` outside `config`'s `[[tables]]` written within its
/// `[control] unconfigured_write_window_secs` (see [`unconfigured_refusals`]).
pub async fn unconfigured_writes(
    authoritative: &Store,
    config: &Config,
) -> Result<UnconfiguredWrites, StoreError> {
    let configured: Vec<_> = config.tables.iter().map(|t| t.name.clone()).collect();
    switchyard_store::table_writes::unconfigured_writes(
        authoritative,
        &configured,
        config.control.unconfigured_write_window,
    )
    .await
}

/// Reads [`AuthoritativeFacts`] on `authoritative` (where the control state and the proxies'
/// heartbeats are). `mirror_deadline` is the mirror's timeout: an intent older than that is a
/// failed mirror waiting for its repair. `live`: how recent a proxy's heartbeat must be to
/// count ([`crate::barrier::live_within`]).
pub async fn authoritative_facts(
    authoritative: &Store,
    mirror_deadline: Duration,
    live: Duration,
) -> Result<AuthoritativeFacts, StoreError> {
    let Store::Postgres(pg_auth) = authoritative;
    let failed = |action: &'static str| {
        move |source| StoreError::Query {
            role: pg_auth.role().as_str(),
            action: action.to_owned(),
            source,
        }
    };
    let pending_repairs = if authoritative
        .has_relation("switchyard.switchyard_intents")
        .await?
    {
        sqlx::query_scalar(
            "SELECT count(*) FROM switchyard.switchyard_intents \
             WHERE created_at < clock_timestamp() - make_interval(secs => $1)",
        )
        .bind(mirror_deadline.as_secs_f64())
        .fetch_one(pg_auth.pool())
        .await
        .map_err(failed("counting pending repairs"))?
    } else {
        0
    };
    let marked_for_verify = if authoritative.has_relation("switchyard.switchyard_verify").await? {
        sqlx::query_scalar("SELECT table_name FROM switchyard.switchyard_verify")
            .fetch_all(pg_auth.pool())
            .await
            .map_err(failed("reading verification marks"))?
    } else {
        Vec::new()
    };
    Ok(AuthoritativeFacts {
        pending_repairs,
        marked_for_verify,
        unconfigured_writes: None,
        plain_sessions: crate::barrier::plain_sessions(authoritative, live).await?,
    })
}

/// Reads the facts for `table` (`schema.table`): the backfill state and the drift results on
/// `new`, pending intents, verification marks and writes to tables outside `config` on
/// `authoritative` (see [`facts`]); the mirror's deadline and the window are `config`'s.
pub async fn gather(
    authoritative: &Store,
    new: &Store,
    table: &str,
    config: &Config,
) -> Result<Facts, StoreError> {
    let Store::Postgres(pg_new) = new;
    let backfill = switchyard_store::backfill_state::backfill_progress(pg_new.pool()).await?;
    let latest = switchyard_drift::latest(new).await?;
    let live = crate::barrier::live_within(&config.control);
    let mut on_authoritative = authoritative_facts(authoritative, config.mirror.timeout, live).await?;
    on_authoritative.unconfigured_writes = Some(unconfigured_writes(authoritative, config).await?);
    Ok(facts(table, &backfill, &latest, &on_authoritative))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sampled: i64, differing: i64, age: f64) -> LatestDrift {
        let (low, high) = wilson(differing as u64, sampled as u64);
        LatestDrift {
            table: "public.t".to_owned(),
            kind: "sample".to_owned(),
            rate: differing as f64 / sampled as f64,
            ci95_low: low,
            ci95_high: high,
            sampled,
            differing,
            recorded_at: "2026-12-05 00:00:00+00".to_owned(),
            age_seconds: age,
            recorded_by: "test".to_owned(),
            phase: "dual_write".to_owned(),
        }
    }

    fn ready() -> Facts {
        Facts {
            backfill: Some("done".to_owned()),
            drift: Some(sample(5000, 0, 10.0)),
            pending_repairs: 0,
            marked_for_verify: false,
            unconfigured_writes: Some(UnconfiguredWrites {
                observed_secs: Some(400.0),
                window_secs: 300.0,
                tables: Vec::new(),
            }),
            plain_sessions: Vec::new(),
        }
    }

    #[test]
    fn everything_in_order_passes() {
        assert!(refusals(&ready(), &ControlSettings::default()).is_empty());
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let s = ControlSettings::default();
        let one = |f: Facts| {
            let r = refusals(&f, &s);
            assert_eq!(r.len(), 1, "{r:?}");
            r.into_iter().next().unwrap_or_default()
        };
        let r = one(Facts {
            backfill: Some("running".to_owned()),
            ..ready()
        });
        assert!(r.contains("backfill is not complete"), "{r}");
        let r = one(Facts {
            backfill: None,
            ..ready()
        });
        assert!(r.contains("backfill has not run"), "{r}");
        let r = one(Facts {
            drift: None,
            ..ready()
        });
        assert!(r.contains("no drift result"), "{r}");
        let r = one(Facts {
            plain_sessions: vec![("a".to_owned(), 2), ("b".to_owned(), 1)],
            ..ready()
        });
        assert!(
            r.starts_with("3 sessions relay plainly") && r.contains("proxies a (2), b (1)"),
            "{r}"
        );
        let r = one(Facts {
            drift: Some(sample(5000, 0, 7200.0)),
            ..ready()
        });
        assert!(r.contains("older than max_drift_age_secs (3600)"), "{r}");
        let r = one(Facts {
            drift: Some(sample(5000, 2, 10.0)),
            ..ready()
        });
        assert!(r.contains("found 2 differing keys"), "{r}");
        let r = one(Facts {
            pending_repairs: 3,
            ..ready()
        });
        assert!(r.contains("3 repairs are pending"), "{r}");
        let r = one(Facts {
            marked_for_verify: true,
            ..ready()
        });
        assert!(r.contains("marked for a full verify"), "{r}");
    }

    #[test]
    fn cutover_is_refused_while_unconfigured_tables_are_written_or_unobserved() {
        use switchyard_store::table_writes::TableWrites;
        let s = ControlSettings::default();
        assert!(cutover_refusals(&ready(), &s).is_empty());
        let written = Facts {
            unconfigured_writes: Some(UnconfiguredWrites {
                observed_secs: Some(400.0),
                window_secs: 300.0,
                tables: vec![TableWrites {
                    table: "public.audit".to_owned(),
                    writes: 12,
                }],
            }),
            ..ready()
        };
        // Raising a read share does not look at other tables.
        assert!(refusals(&written, &s).is_empty());
        let r = cutover_refusals(&written, &s);
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(
            r[0].contains("table public.audit is not configured") && r[0].contains("12 rows"),
            "{}",
            r[0]
        );
        for unobserved in [
            None,
            Some(UnconfiguredWrites {
                window_secs: 300.0,
                ..UnconfiguredWrites::default()
            }),
        ] {
            let r = cutover_refusals(
                &Facts {
                    unconfigured_writes: unobserved,
                    ..ready()
                },
                &s,
            );
            assert_eq!(r.len(), 1, "{r:?}");
            assert!(
                r[0].contains("not been observed yet") && r[0].contains("--force"),
                "{}",
                r[0]
            );
        }
        let short = Facts {
            unconfigured_writes: Some(UnconfiguredWrites {
                observed_secs: Some(60.0),
                window_secs: 300.0,
                tables: Vec::new(),
            }),
            ..ready()
        };
        let r = cutover_refusals(&short, &s);
        assert!(
            r.len() == 1 && r[0].contains("observed for only 60 s of the 5 min window"),
            "{r:?}"
        );
    }

    #[test]
    fn a_clean_sample_too_small_says_how_many_more_keys() {
        let r = refusals(
            &Facts {
                drift: Some(sample(1000, 0, 10.0)),
                ..ready()
            },
            &ControlSettings::default(),
        );
        let needed = keys_for_bound(0.001);
        assert!((3800..3900).contains(&needed), "{needed}");
        assert!(wilson(0, needed).1 <= 0.001 && wilson(0, needed - 1).1 > 0.001);
        assert_eq!(r.len(), 1);
        assert!(
            r[0].contains(&format!("about {needed} keys ({} more)", needed - 1000)),
            "{}",
            r[0]
        );
    }
}
