//! One table as the drift checker reads it: its key, and the queries (PostgreSQL) that draw
//! keys, hash key ranges and read rows by key, all on connections set up for canonical values
//! ([`crate::canonical`]).

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{AssertSqlSafe, Row};
use switchyard_config::{Phase, TableName, TableSettings};
use switchyard_store::mirror::escape_literal;
use switchyard_store::prepare::INTENTS_TABLE;
use switchyard_store::{
    effective_key, keys_table_name, quote_ident, quote_table, Role, Store, StoreError, SIDE_SCHEMA,
};

use crate::canonical::RowExprs;
use crate::DriftError;

/// Sampling hashes a key to 32 bits: a key is drawn when its hash is below a threshold in
/// `0..HASH_RANGE`.
pub(crate) const HASH_RANGE: i64 = 1 << 32;

/// A configured table with a key, ready to be compared.
#[derive(Debug, Clone)]
pub struct DriftTable {
    pub name: TableName,
    /// The key columns, in order.
    pub key: Vec<String>,
    /// Their types, as the catalog names them (for casting keys read as text back).
    pub key_types: Vec<String>,
    /// The configured phase, recorded with each result.
    pub phase: Phase,
    /// How rows are read for comparison on OLD and on NEW: OLD's columns, by name.
    on_old: RowExprs,
    on_new: RowExprs,
}

impl DriftTable {
    /// Reads the table's definition on both stores: the configured key or OLD's primary key,
    /// and the columns compared (OLD's; NEW may have more, in any order).
    pub async fn load(old: &Store, new: &Store, settings: &TableSettings) -> Result<DriftTable, DriftError> {
        let table = settings.name.to_string();
        let problem = |problem: String| DriftError::Table {
            table: table.clone(),
            problem,
        };
        let schema = old
            .load_table(&settings.name)
            .await?
            .ok_or_else(|| problem("it does not exist on OLD".to_owned()))?;
        let on_new = new
            .load_table(&settings.name)
            .await?
            .ok_or_else(|| problem("it does not exist on NEW".to_owned()))?;
        let key = effective_key(settings, &schema);
        if key.is_empty() {
            return Err(problem(
                "it has no key (no primary key and no configured key); tables without a key are not compared yet"
                    .to_owned(),
            ));
        }
        let mut key_types = Vec::new();
        for k in &key {
            let column = schema
                .column(k)
                .ok_or_else(|| problem(format!("key column {k} does not exist on OLD")))?;
            // Rows with a NULL key cannot be told apart or found again by key.
            if !column.not_null {
                return Err(problem(format!(
                    "key column {k} may be NULL on OLD; make it NOT NULL or configure a key whose columns are"
                )));
            }
            key_types.push(column.type_name.clone());
        }
        let compared: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
        let new_columns: Vec<String> = on_new.columns.iter().map(|c| c.name.clone()).collect();
        if let Some(missing) = compared.iter().find(|c| !new_columns.contains(c)) {
            return Err(problem(format!(
                "column {missing} is missing on NEW (rows are compared by OLD's columns, by name)"
            )));
        }
        Ok(DriftTable {
            name: settings.name.clone(),
            key,
            key_types,
            phase: settings.phase,
            on_old: RowExprs::new("t", &compared, &compared),
            on_new: RowExprs::new("t", &new_columns, &compared),
        })
    }

    /// The row expressions for `store`'s side.
    fn exprs(&self, store: &Store) -> &RowExprs {
        match store.role() {
            Role::Old => &self.on_old,
            Role::New => &self.on_new,
        }
    }

    fn quoted(&self) -> String {
        quote_table(&self.name)
    }

    /// `t.k1, t.k2`
    fn key_list(&self) -> String {
        self.key
            .iter()
            .map(|k| format!("t.{}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `t.k1::text, t.k2::text`
    fn key_text(&self) -> String {
        self.key
            .iter()
            .map(|k| format!("t.{}::text", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `($n::type1, $n+1::type2)`: a key bound as text parameters from `first` on.
    fn key_params(&self, first: usize) -> String {
        let parts: Vec<String> = self
            .key_types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::text::{t}", first + i))
            .collect();
        format!("({})", parts.join(", "))
    }

    /// `WHERE` conditions for the key range `(lo, hi]`, parameters from `$1`; `None` ends are
    /// open. Returns the SQL and the parameters in order.
    fn range_condition(&self, lo: Option<&[String]>, hi: Option<&[String]>) -> (String, Vec<String>) {
        let mut conds = vec!["true".to_owned()];
        let mut params = Vec::new();
        if let Some(lo) = lo {
            conds.push(format!(
                "({}) > {}",
                self.key_list(),
                self.key_params(params.len() + 1)
            ));
            params.extend(lo.iter().cloned());
        }
        if let Some(hi) = hi {
            conds.push(format!(
                "({}) <= {}",
                self.key_list(),
                self.key_params(params.len() + 1)
            ));
            params.extend(hi.iter().cloned());
        }
        (conds.join(" AND "), params)
    }

    /// The store's clock, as text.
    pub(crate) async fn clock(&self, store: &Store) -> Result<String, DriftError> {
        let Store::Postgres(pg) = store;
        Ok(sqlx::query_scalar("SELECT clock_timestamp()::text")
            .fetch_one(pg.pool())
            .await
            .map_err(failed(store, "reading the clock"))?)
    }

    /// Rows in the table.
    pub(crate) async fn count(&self, store: &Store) -> Result<u64, DriftError> {
        let Store::Postgres(pg) = store;
        let sql = format!("SELECT count(*) FROM {}", self.quoted());
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(pg.pool())
            .await
            .map_err(failed(store, "counting rows"))?;
        Ok(n as u64)
    }

    /// The keys whose seeded hash is below `threshold`: each key is drawn with probability
    /// `threshold / HASH_RANGE`, independently of the others, and the same key on the other
    /// store gets the same hash.
    pub(crate) async fn sampled_keys(
        &self,
        store: &Store,
        seed: u64,
        threshold: i64,
    ) -> Result<Vec<Vec<String>>, DriftError> {
        let Store::Postgres(pg) = store;
        let sql = format!(
            "SELECT {keys} FROM {table} t \
             WHERE ('x' || substr(md5($1 || ROW({list})::text), 1, 8))::bit(32)::bigint < $2",
            keys = self.key_text(),
            table = self.quoted(),
            list = self.key_list(),
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(format!("{seed}:"))
            .bind(threshold)
            .fetch_all(pg.pool())
            .await
            .map_err(failed(store, "drawing sample keys"))?;
        Ok(rows.iter().map(|r| self.key_of(r)).collect())
    }

    /// Upper bounds of key ranges of about `chunk` rows each, and where they came from. Any
    /// increasing bounds are correct (the ranges between them, open at both ends, cover every
    /// key); they only need to be about the right size. For a one-column key, the histogram
    /// PostgreSQL keeps for the planner (`pg_stats.histogram_bounds`, buckets of equal row
    /// counts as of the last ANALYZE) gives them at no cost, when its buckets are at most twice
    /// `chunk` rows; otherwise every `chunk`-th key is read in key order (a pass over the key's
    /// index, about a tenth of a verify's time on a million rows).
    pub(crate) async fn range_bounds(
        &self,
        store: &Store,
        chunk: u64,
    ) -> Result<(Vec<Vec<String>>, RangesFrom), DriftError> {
        if let Some(bounds) = self.histogram_bounds(store, chunk).await? {
            return Ok((bounds, RangesFrom::Statistics));
        }
        Ok((self.every_nth_key(store, chunk).await?, RangesFrom::Keys))
    }

    /// Bounds from the planner's histogram of a one-column key, thinned to buckets of about
    /// `chunk` rows; `None` when there is no histogram or its buckets are too coarse.
    async fn histogram_bounds(
        &self,
        store: &Store,
        chunk: u64,
    ) -> Result<Option<Vec<Vec<String>>>, DriftError> {
        let Store::Postgres(pg) = store;
        let [key] = self.key.as_slice() else {
            return Ok(None);
        };
        let row: Option<(Option<Vec<String>>, f32)> = sqlx::query_as(
            "SELECT s.histogram_bounds::text::text[], c.reltuples FROM pg_stats s \
             JOIN pg_class c ON c.oid = format('%I.%I', s.schemaname, s.tablename)::regclass \
             WHERE s.schemaname = $1 AND s.tablename = $2 AND s.attname = $3 AND NOT s.inherited",
        )
        .bind(&self.name.schema)
        .bind(&self.name.table)
        .bind(key)
        .fetch_optional(pg.pool())
        .await
        .map_err(failed(store, "reading the key's statistics"))?;
        let Some((Some(bounds), rows)) = row else {
            return Ok(None);
        };
        Ok(thin_histogram(bounds, rows, chunk))
    }

    /// Every `chunk`-th key of the table in key order.
    async fn every_nth_key(&self, store: &Store, chunk: u64) -> Result<Vec<Vec<String>>, DriftError> {
        let Store::Postgres(pg) = store;
        let outer: Vec<String> = (0..self.key.len()).map(|i| format!("s.k{i}")).collect();
        let inner: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("t.{} AS k{i}", quote_ident(k)))
            .collect();
        let outer_text: Vec<String> = outer.iter().map(|c| format!("{c}::text")).collect();
        let sql = format!(
            "SELECT {outer_text} FROM (SELECT {inner}, row_number() OVER (ORDER BY {list}) AS rn FROM {table} t) s \
             WHERE s.rn % $1 = 0 ORDER BY {outer}",
            outer_text = outer_text.join(", "),
            inner = inner.join(", "),
            list = self.key_list(),
            table = self.quoted(),
            outer = outer.join(", "),
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(chunk as i64)
            .fetch_all(pg.pool())
            .await
            .map_err(failed(store, "choosing key ranges"))?;
        Ok(rows.iter().map(|r| self.key_of(r)).collect())
    }

    /// The number of rows in `(lo, hi]` and a hash of their values in key order, computed in
    /// the database ([`RowExprs::fast`]: equal hashes mean equal rows; unequal ones
    /// send the range to the exact comparison).
    pub(crate) async fn range_hash(
        &self,
        store: &Store,
        lo: Option<&[String]>,
        hi: Option<&[String]>,
    ) -> Result<(i64, String), DriftError> {
        let Store::Postgres(pg) = store;
        let (cond, params) = self.range_condition(lo, hi);
        let sql = format!(
            "SELECT count(*), coalesce(md5(string_agg(md5({row}), '' ORDER BY {list})), '') \
             FROM {table} t WHERE {cond}",
            row = self.exprs(store).fast,
            list = self.key_list(),
            table = self.quoted(),
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for p in params {
            q = q.bind(p);
        }
        let row = q
            .fetch_one(pg.pool())
            .await
            .map_err(failed(store, "hashing a key range"))?;
        Ok((row.get(0), row.get(1)))
    }

    /// Every key in `(lo, hi]` with a hash of its row.
    pub(crate) async fn range_rows(
        &self,
        store: &Store,
        lo: Option<&[String]>,
        hi: Option<&[String]>,
    ) -> Result<BTreeMap<Vec<String>, String>, DriftError> {
        let Store::Postgres(pg) = store;
        let (cond, params) = self.range_condition(lo, hi);
        let sql = format!(
            "SELECT {keys}, md5({row}) FROM {table} t WHERE {cond}",
            keys = self.key_text(),
            row = self.exprs(store).exact,
            table = self.quoted(),
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for p in params {
            q = q.bind(p);
        }
        let rows = q
            .fetch_all(pg.pool())
            .await
            .map_err(failed(store, "reading a key range"))?;
        Ok(rows
            .iter()
            .map(|r| (self.key_of(r), r.get::<String, _>(self.key.len())))
            .collect())
    }

    /// The canonical rows of `keys` that exist on `store`.
    pub(crate) async fn rows_by_key(
        &self,
        store: &Store,
        keys: &[Vec<String>],
    ) -> Result<BTreeMap<Vec<String>, String>, DriftError> {
        let row = &self.exprs(store).exact;
        let rows = self
            .select_by_key(store, keys, row, &self.quoted(), "reading rows by key")
            .await?;
        Ok(rows
            .iter()
            .map(|r| (self.key_of(r), r.get::<String, _>(self.key.len())))
            .collect())
    }

    /// The version of each of `keys` in the key records on NEW (`switchyard prepare`'s keys
    /// table); none when the table has no key records.
    pub(crate) async fn key_versions(
        &self,
        new: &Store,
        keys: &[Vec<String>],
    ) -> Result<BTreeMap<Vec<String>, i64>, DriftError> {
        let records = TableName::new(SIDE_SCHEMA, keys_table_name(&self.name));
        if keys.is_empty()
            || !new
                .has_relation(&format!("{}.{}", records.schema, records.table))
                .await?
        {
            return Ok(BTreeMap::new());
        }
        let rows = self
            .select_by_key(
                new,
                keys,
                "t.sy_version",
                &quote_table(&records),
                "reading key records",
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (self.key_of(r), r.get::<i64, _>(self.key.len())))
            .collect())
    }

    /// Those of `keys` that an intent on OLD names: a mirrored write to them is in flight, or
    /// failed and waits for its repair.
    pub(crate) async fn keys_in_intents(
        &self,
        old: &Store,
        keys: &[Vec<String>],
    ) -> Result<BTreeSet<Vec<String>>, DriftError> {
        let Store::Postgres(pg) = old;
        let intents = format!("{SIDE_SCHEMA}.{INTENTS_TABLE}");
        if keys.is_empty() || !old.has_relation(&intents).await? {
            return Ok(BTreeSet::new());
        }
        // Each key column of the image as the key's own type, printed as the key is read here.
        let columns: Vec<String> = self
            .key
            .iter()
            .zip(&self.key_types)
            .map(|(k, t)| format!("(k.value ->> {})::{t}::text", escape_literal(k)))
            .collect();
        let sql = format!(
            "SELECT DISTINCT {columns} FROM {intents} i \
             CROSS JOIN LATERAL jsonb_array_elements(i.changes) e \
             CROSS JOIN LATERAL jsonb_array_elements(e.value -> 'k') k \
             WHERE e.value ->> 't' = $1",
            columns = columns.join(", "),
            intents = quote_table(&TableName::new(SIDE_SCHEMA, INTENTS_TABLE)),
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(self.name.to_string())
            .fetch_all(pg.pool())
            .await
            .map_err(failed(old, "reading the keys of pending intents"))?;
        let wanted: BTreeSet<&Vec<String>> = keys.iter().collect();
        Ok(rows
            .iter()
            .map(|r| self.key_of(r))
            .filter(|k| wanted.contains(k))
            .collect())
    }

    /// `SELECT <key as text>, <select> FROM <from> t` for the rows of `keys` (bound as text
    /// arrays, one per key column, cast back to the key's types).
    async fn select_by_key(
        &self,
        store: &Store,
        keys: &[Vec<String>],
        select: &str,
        from: &str,
        action: &'static str,
    ) -> Result<Vec<sqlx::postgres::PgRow>, DriftError> {
        let Store::Postgres(pg) = store;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let columns: Vec<String> = (0..self.key.len()).map(|i| format!("c{i}")).collect();
        let arrays: Vec<String> = (0..self.key.len())
            .map(|i| format!("${}::text[]", i + 1))
            .collect();
        let casts: Vec<String> = self
            .key_types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("u.c{i}::{t}"))
            .collect();
        let sql = format!(
            "SELECT {keys}, {select} FROM {from} t WHERE ({list}) IN \
             (SELECT {casts} FROM unnest({arrays}) AS u({columns}))",
            keys = self.key_text(),
            list = self.key_list(),
            casts = casts.join(", "),
            arrays = arrays.join(", "),
            columns = columns.join(", "),
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for i in 0..self.key.len() {
            let column: Vec<String> = keys.iter().map(|k| k[i].clone()).collect();
            q = q.bind(column);
        }
        Ok(q.fetch_all(pg.pool()).await.map_err(failed(store, action))?)
    }

    fn key_of(&self, row: &sqlx::postgres::PgRow) -> Vec<String> {
        (0..self.key.len()).map(|i| row.get::<String, _>(i)).collect()
    }
}

/// Where a verify's key ranges came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RangesFrom {
    /// The planner's histogram of the key (`pg_stats`).
    Statistics,
    /// Every `chunk_rows`-th key, read in key order.
    Keys,
}

/// `bounds` (a histogram of a table of about `rows` rows: equal row counts between neighbours)
/// thinned to about `chunk` rows between the ones kept; `None` when its buckets hold more than
/// twice `chunk` rows (ranges that large would make a differing range slow to read key by key)
/// or the table's size is unknown.
fn thin_histogram(bounds: Vec<String>, rows: f32, chunk: u64) -> Option<Vec<Vec<String>>> {
    if bounds.len() < 2 || rows <= 0.0 {
        return None;
    }
    let per_bucket = f64::from(rows) / (bounds.len() - 1) as f64;
    if per_bucket > 2.0 * chunk as f64 {
        return None;
    }
    let step = ((chunk as f64 / per_bucket.max(1.0)).floor() as usize).max(1);
    Some(bounds.into_iter().step_by(step).map(|b| vec![b]).collect())
}

/// Turns a query's error on `store` into a [`StoreError`] that says what was being done.
pub(crate) fn failed(store: &Store, action: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
    let role = store.role().as_str();
    move |source| StoreError::Query {
        role,
        action: action.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(n: usize) -> Vec<String> {
        (0..n).map(|i| (i * 100).to_string()).collect()
    }

    #[test]
    fn a_histogram_is_thinned_to_the_range_size_or_refused_when_coarse() {
        // 101 bounds over 1,000,000 rows: buckets of 10,000.
        let kept = thin_histogram(histogram(101), 1_000_000.0, 10_000).unwrap();
        assert_eq!(kept.len(), 101);
        // Ranges of 50,000 rows: every fifth bound.
        let kept = thin_histogram(histogram(101), 1_000_000.0, 50_000).unwrap();
        assert_eq!(kept.len(), 21);
        assert_eq!(kept[1], ["500"]);
        // Buckets of 10,000 rows for ranges of 1,000: too coarse.
        assert_eq!(thin_histogram(histogram(101), 1_000_000.0, 1_000), None);
        // Never analyzed (reltuples -1), or no buckets.
        assert_eq!(thin_histogram(histogram(101), -1.0, 10_000), None);
        assert_eq!(thin_histogram(histogram(1), 1_000.0, 10_000), None);
    }
}
