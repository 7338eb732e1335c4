//! What a drift check found, as printed (`--json`) and as recorded on NEW.

use serde::Serialize;
use switchyard_config::Phase;
use switchyard_store::{Store, StoreError};

use crate::MAX_EXAMPLES;

/// How a key differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffKind {
    /// OLD has the key, NEW does not.
    MissingInNew,
    /// NEW has the key, OLD does not.
    ExtraInNew,
    /// Both have it with different values.
    ValueDiffers,
}

impl DiffKind {
    /// The name used in JSON and on NEW.
    pub fn as_str(self) -> &'static str {
        match self {
            DiffKind::MissingInNew => "missing_in_new",
            DiffKind::ExtraInNew => "extra_in_new",
            DiffKind::ValueDiffers => "value_differs",
        }
    }

    fn parse(s: &str) -> Option<DiffKind> {
        [
            DiffKind::MissingInNew,
            DiffKind::ExtraInNew,
            DiffKind::ValueDiffers,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One differing key: its column values as text, in key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DifferingKey {
    pub key: Vec<String>,
    pub kind: DiffKind,
}

/// The result of [`crate::sample`].
#[derive(Debug, Clone, Serialize)]
pub struct SampleReport {
    pub table: String,
    /// Keys drawn (of the union of both stores' keys).
    pub sampled: u64,
    /// Of those, keys that differ (after re-reads).
    pub differing: u64,
    pub missing_in_new: u64,
    pub extra_in_new: u64,
    pub value_differs: u64,
    /// `differing / sampled`: the estimated share of keys that differ.
    pub rate: f64,
    /// The 95% Wilson score interval of the rate.
    pub ci95_low: f64,
    pub ci95_high: f64,
    pub rows_old: u64,
    pub rows_new: u64,
    pub seconds: f64,
    /// The seed that chose the keys (the same seed draws the same keys).
    pub seed: u64,
    /// Up to [`MAX_EXAMPLES`] differing keys.
    pub examples: Vec<DifferingKey>,
}

impl SampleReport {
    pub(crate) fn new(table: String, sampled: u64, rows_old: u64, rows_new: u64) -> SampleReport {
        let (ci95_low, ci95_high) = wilson(0, sampled);
        SampleReport {
            table,
            sampled,
            differing: 0,
            missing_in_new: 0,
            extra_in_new: 0,
            value_differs: 0,
            rate: 0.0,
            ci95_low,
            ci95_high,
            rows_old,
            rows_new,
            seconds: 0.0,
            seed: 0,
            examples: Vec::new(),
        }
    }

    pub(crate) fn count(&mut self, d: &DifferingKey) {
        self.differing += 1;
        match d.kind {
            DiffKind::MissingInNew => self.missing_in_new += 1,
            DiffKind::ExtraInNew => self.extra_in_new += 1,
            DiffKind::ValueDiffers => self.value_differs += 1,
        }
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(d.clone());
        }
        self.rate = self.differing as f64 / self.sampled.max(1) as f64;
        (self.ci95_low, self.ci95_high) = wilson(self.differing, self.sampled);
    }
}

/// The result of [`crate::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub table: String,
    pub rows_old: u64,
    pub rows_new: u64,
    /// Key ranges hashed on both sides.
    pub chunks: u64,
    /// Whether this verify took over a run that had stopped (killed, or its store failed).
    pub resumed: bool,
    /// Ranges that run had already compared (not compared again).
    pub resumed_ranges: u64,
    /// Where the ranges' bounds came from: `statistics` (the key's planner histogram) or
    /// `keys` (every `chunk_rows`-th key read).
    pub ranges_from: Option<crate::table::RangesFrom>,
    pub differing: u64,
    pub missing_in_new: u64,
    pub extra_in_new: u64,
    pub value_differs: u64,
    /// Every differing key.
    pub differing_keys: Vec<DifferingKey>,
    pub seconds: f64,
    /// Rows compared (both sides) per second, by this process (a resumed run's earlier ranges
    /// are not counted).
    pub rows_per_sec: f64,
    /// OLD's clock when the verify began (a verification mark older than this is cleared by a
    /// clean verify).
    pub started_on_old: String,
}

impl VerifyReport {
    pub(crate) fn new(table: String, rows_old: u64, rows_new: u64) -> VerifyReport {
        VerifyReport {
            table,
            rows_old,
            rows_new,
            chunks: 0,
            resumed: false,
            resumed_ranges: 0,
            ranges_from: None,
            differing: 0,
            missing_in_new: 0,
            extra_in_new: 0,
            value_differs: 0,
            differing_keys: Vec::new(),
            seconds: 0.0,
            rows_per_sec: 0.0,
            started_on_old: String::new(),
        }
    }

    pub(crate) fn add(&mut self, d: DifferingKey) {
        self.differing += 1;
        match d.kind {
            DiffKind::MissingInNew => self.missing_in_new += 1,
            DiffKind::ExtraInNew => self.extra_in_new += 1,
            DiffKind::ValueDiffers => self.value_differs += 1,
        }
        self.differing_keys.push(d);
    }
}

/// The 95% Wilson score interval for `k` successes in `n` trials: good coverage even for rates
/// near 0, where the normal approximation's interval collapses to a point.
/// <https://en.wikipedia.org/wiki/Binomial_proportion_confidence_interval#Wilson_score_interval>
pub fn wilson(k: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) / n) + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// One recorded result.
pub enum Recorded<'a> {
    Sample(&'a SampleReport),
    Verify(&'a VerifyReport),
}

const DRIFT_TABLE_DDL: &str = "CREATE SCHEMA IF NOT EXISTS switchyard; \
     CREATE TABLE IF NOT EXISTS switchyard.switchyard_drift ( \
       id bigserial PRIMARY KEY, \
       table_name text NOT NULL, \
       kind text NOT NULL CHECK (kind IN ('sample', 'verify')), \
       sampled bigint NOT NULL, \
       differing bigint NOT NULL, \
       rate double precision NOT NULL, \
       ci95_low double precision NOT NULL, \
       ci95_high double precision NOT NULL, \
       rows_old bigint NOT NULL, \
       rows_new bigint NOT NULL, \
       phase text NOT NULL, \
       recorded_at timestamptz NOT NULL DEFAULT now(), \
       recorded_by text NOT NULL); \
     CREATE INDEX IF NOT EXISTS switchyard_drift_latest ON switchyard.switchyard_drift (table_name, recorded_at DESC); \
     CREATE TABLE IF NOT EXISTS switchyard.switchyard_drift_keys ( \
       drift_id bigint NOT NULL REFERENCES switchyard.switchyard_drift ON DELETE CASCADE, \
       key text[] NOT NULL, \
       kind text NOT NULL)";

/// Records a result in `switchyard.switchyard_drift` on NEW (created if missing): the table,
/// the kind, the estimate and its bounds (a verify is exact: its bounds are its rate), the row
/// counts, the table's configured phase, when and by whom.
pub async fn record(new: &Store, result: Recorded<'_>, phase: Phase, by: &str) -> Result<(), StoreError> {
    let Store::Postgres(pg) = new;
    let failed = |action: &'static str| {
        move |source| StoreError::Query {
            role: pg.role().as_str(),
            action: action.to_owned(),
            source,
        }
    };
    sqlx::raw_sql(DRIFT_TABLE_DDL)
        .execute(pg.pool())
        .await
        .map_err(failed("creating switchyard.switchyard_drift"))?;
    let (kind, table, sampled, differing, rate, low, high, rows_old, rows_new) = match result {
        Recorded::Sample(r) => (
            "sample",
            &r.table,
            r.sampled,
            r.differing,
            r.rate,
            r.ci95_low,
            r.ci95_high,
            r.rows_old,
            r.rows_new,
        ),
        Recorded::Verify(r) => {
            // Every key of the union: OLD's, and those only NEW has.
            let union = (r.rows_old + r.extra_in_new).max(1);
            let rate = r.differing as f64 / union as f64;
            (
                "verify",
                &r.table,
                union,
                r.differing,
                rate,
                rate,
                rate,
                r.rows_old,
                r.rows_new,
            )
        }
    };
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO switchyard.switchyard_drift (table_name, kind, sampled, differing, rate, ci95_low, \
         ci95_high, rows_old, rows_new, phase, recorded_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         RETURNING id",
    )
    .bind(table)
    .bind(kind)
    .bind(sampled as i64)
    .bind(differing as i64)
    .bind(rate)
    .bind(low)
    .bind(high)
    .bind(rows_old as i64)
    .bind(rows_new as i64)
    .bind(phase.as_str())
    .bind(by)
    .fetch_one(pg.pool())
    .await
    .map_err(failed("recording a drift result"))?;
    if let Recorded::Verify(r) = result {
        // A verify's keys, for `drift repair --from-verify`.
        for chunk in r.differing_keys.chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(|d| text_array(&d.key)).collect();
            let kinds: Vec<&str> = chunk.iter().map(|d| d.kind.as_str()).collect();
            sqlx::query(
                "INSERT INTO switchyard.switchyard_drift_keys (drift_id, key, kind) \
                 SELECT $1, k::text[], kind FROM unnest($2::text[], $3::text[]) AS u(k, kind)",
            )
            .bind(id)
            .bind(keys)
            .bind(kinds)
            .execute(pg.pool())
            .await
            .map_err(failed("recording a verify's differing keys"))?;
        }
    }
    Ok(())
}

/// The differing keys of `table`'s latest recorded verify, and when it ran; `None` when no
/// verify was recorded.
pub async fn latest_verify_keys(new: &Store, table: &str) -> Result<Option<Vec<DifferingKey>>, StoreError> {
    let Store::Postgres(pg) = new;
    let failed = |source| StoreError::Query {
        role: pg.role().as_str(),
        action: "reading the latest verify".to_owned(),
        source,
    };
    if !new.has_relation("switchyard.switchyard_drift_keys").await? {
        return Ok(None);
    }
    let id: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM switchyard.switchyard_drift WHERE table_name = $1 AND kind = 'verify' \
         ORDER BY recorded_at DESC, id DESC LIMIT 1",
    )
    .bind(table)
    .fetch_optional(pg.pool())
    .await
    .map_err(failed)?;
    let Some(id) = id else { return Ok(None) };
    let rows: Vec<(Vec<String>, String)> =
        sqlx::query_as("SELECT key, kind FROM switchyard.switchyard_drift_keys WHERE drift_id = $1")
            .bind(id)
            .fetch_all(pg.pool())
            .await
            .map_err(failed)?;
    Ok(Some(
        rows.into_iter()
            .filter_map(|(key, kind)| {
                Some(DifferingKey {
                    key,
                    kind: DiffKind::parse(&kind)?,
                })
            })
            .collect(),
    ))
}

/// `{"a","b"}`: a text array literal.
fn text_array(values: &[String]) -> String {
    let quoted: Vec<String> = values
        .iter()
        .map(|v| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_bounds_match_known_values() {
        // 0 of 3,000: the upper bound falls just under 0.0013.
        let (lo, hi) = wilson(0, 3000);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.00128).abs() < 0.00001, "{hi}");
        // 10 of 100: about 0.055 .. 0.174.
        let (lo, hi) = wilson(10, 100);
        assert!(
            (lo - 0.0552).abs() < 0.001 && (hi - 0.1744).abs() < 0.001,
            "{lo} {hi}"
        );
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }
}

/// The latest recorded result of one kind for one table, as proxies show it.
#[derive(Debug, Clone, Serialize)]
pub struct LatestDrift {
    pub table: String,
    /// `sample` or `verify`.
    pub kind: String,
    pub rate: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    /// Keys compared.
    pub sampled: i64,
    pub differing: i64,
    /// When, as NEW's clock printed it.
    pub recorded_at: String,
    /// Seconds since, when read.
    pub age_seconds: f64,
    pub recorded_by: String,
    /// The table's configured phase at the time.
    pub phase: String,
}

/// The latest sample and the latest verify of every table recorded on NEW (none before the
/// first result is recorded).
pub async fn latest(new: &Store) -> Result<Vec<LatestDrift>, StoreError> {
    let Store::Postgres(pg) = new;
    let failed = |source| StoreError::Query {
        role: pg.role().as_str(),
        action: "reading the latest drift results".to_owned(),
        source,
    };
    if !new.has_relation("switchyard.switchyard_drift").await? {
        return Ok(Vec::new());
    }
    type Row = (
        String,
        String,
        f64,
        f64,
        f64,
        i64,
        i64,
        String,
        f64,
        String,
        String,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT DISTINCT ON (table_name, kind) table_name, kind, rate, ci95_low, ci95_high, sampled, differing, \
         recorded_at::text, extract(epoch FROM clock_timestamp() - recorded_at)::float8, recorded_by, phase \
         FROM switchyard.switchyard_drift ORDER BY table_name, kind, recorded_at DESC, id DESC",
    )
    .fetch_all(pg.pool())
    .await
    .map_err(failed)?;
    Ok(rows
        .into_iter()
        .map(
            |(
                table,
                kind,
                rate,
                ci95_low,
                ci95_high,
                sampled,
                differing,
                recorded_at,
                age_seconds,
                recorded_by,
                phase,
            )| {
                LatestDrift {
                    table,
                    kind,
                    rate,
                    ci95_low,
                    ci95_high,
                    sampled,
                    differing,
                    recorded_at,
                    age_seconds,
                    recorded_by,
                    phase,
                }
            },
        )
        .collect())
}

/// One recorded result, for a chart of the estimate over time.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryPoint {
    pub table: String,
    /// `sample` or `verify`.
    pub kind: String,
    pub rate: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    /// Seconds since the Unix epoch, on NEW's clock.
    pub at_unix: f64,
}

/// The latest `per_table` results of every table recorded on NEW, oldest first per table (none
/// before the first result is recorded).
pub async fn history(new: &Store, per_table: i64) -> Result<Vec<HistoryPoint>, StoreError> {
    let Store::Postgres(pg) = new;
    if !new.has_relation("switchyard.switchyard_drift").await? {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, String, f64, f64, f64, f64)> = sqlx::query_as(
        "SELECT table_name, kind, rate, ci95_low, ci95_high, at FROM ( \
           SELECT table_name, kind, rate, ci95_low, ci95_high, extract(epoch FROM recorded_at)::float8 AS at, \
                  row_number() OVER (PARTITION BY table_name ORDER BY recorded_at DESC, id DESC) AS n \
           FROM switchyard.switchyard_drift) r \
         WHERE n <= $1 ORDER BY table_name, at",
    )
    .bind(per_table)
    .fetch_all(pg.pool())
    .await
    .map_err(|source| StoreError::Query {
        role: pg.role().as_str(),
        action: "reading the drift history".to_owned(),
        source,
    })?;
    Ok(rows
        .into_iter()
        .map(|(table, kind, rate, ci95_low, ci95_high, at_unix)| HistoryPoint {
            table,
            kind,
            rate,
            ci95_low,
            ci95_high,
            at_unix,
        })
        .collect())
}
