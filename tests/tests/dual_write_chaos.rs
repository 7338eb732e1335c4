//! Chaos for the dual-write engine: a seeded, time-bounded, randomized concurrent workload
//! through two proxies while the link to NEW is slowed, reset, partitioned and NEW itself is
//! crashed (SIGKILL, losing whatever WAL it had not written: the mirror commits on NEW without
//! waiting for the flush) and started again. Afterwards OLD and NEW must be identical (promise 1)
//! and every write a client saw committed must be in OLD (promise 4).
//!
//! `SWITCHYARD_CHAOS_SEED=<u64>` replays a run; the seed is printed first. The random choices
//! (operations, keys, values, protocol, fault parameters) follow from the seed; the thread
//! interleaving does not, so a seed reproduces the workload, not the exact schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard_test_support::{
    quote_literal, server_of, ClusterOptions, DualEnv, DualTable, FaultProxy, TestCluster, TestProxy,
};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

const DEFAULT_SEED: u64 = 0x5EED_2024_C4A0;
/// How long the clients run.
const WORKLOAD: Duration = Duration::from_secs(22);
const TASKS: usize = 10;
/// Shared keys: items 1..=SHARED_ITEMS, pairs REGIONS x 0..PAIRS_PER_REGION.
const SHARED_ITEMS: i64 = 50;
const REGIONS: [&str; 5] = ["eu", "us", "ap", "sa", "af"];
const PAIRS_PER_REGION: i32 = 10;
/// Private pair keys per task: ('t<task>', 0..PRIVATE_PAIRS).
const PRIVATE_PAIRS: i32 = 5;
/// DB errors a correct engine may hand a client under this workload.
const EXPECTED_CODES: &[&str] = &["40P01", "40001", "23505"];

const SCHEMA: &str = "
CREATE TABLE items (
    id bigserial PRIMARY KEY,
    qty integer NOT NULL DEFAULT 0,
    price numeric(12,2) NOT NULL DEFAULT 0,
    meta jsonb,
    tags text[],
    owner integer NOT NULL DEFAULT 0,
    updated timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE pairs (
    region text NOT NULL,
    n integer NOT NULL,
    val numeric(12,2) NOT NULL,
    doc jsonb NOT NULL DEFAULT '{}',
    labels text[] NOT NULL DEFAULT '{}',
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (region, n)
);
CREATE TABLE events (
    task integer NOT NULL,
    seq bigint NOT NULL,
    kind text NOT NULL,
    amount numeric NOT NULL,
    payload jsonb,
    tags text[],
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
";

fn tables() -> Vec<DualTable> {
    vec![
        DualTable::new("items"),
        DualTable::new("pairs"),
        DualTable::new("events"),
    ]
}

fn seed() -> u64 {
    std::env::var("SWITCHYARD_CHAOS_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim();
            s.strip_prefix("0x")
                .map_or_else(|| s.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or(DEFAULT_SEED)
}

fn money(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

fn text_array_literal(tags: &[String]) -> String {
    let items: Vec<String> = tags.iter().map(|t| quote_literal(t)).collect();
    format!("ARRAY[{}]::text[]", items.join(", "))
}

fn random_tags(rng: &mut StdRng) -> Vec<String> {
    const WORDS: [&str; 6] = ["red", "it's", "back\\slash", "naïve", "{brace}", "a,b"];
    (0..rng.gen_range(0..4))
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())].to_owned())
        .collect()
}

/// What a task expects to find in OLD for the keys only it writes.
#[derive(Debug, Default)]
struct Expected {
    /// Private items (serial ids): qty, or `None` = deleted.
    items: BTreeMap<i64, Option<i32>>,
    /// Private pairs ('t<task>', n): val in cents, or `None` = deleted.
    pairs: BTreeMap<i32, Option<i64>>,
    /// Event sequence numbers committed.
    events: BTreeSet<i64>,
}

#[derive(Debug, Clone)]
enum Effect {
    Item(i64, Option<i32>),
    Pair(i32, Option<i64>),
    Event(i64),
}

impl Expected {
    fn apply(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::Item(id, v) => {
                    self.items.insert(*id, *v);
                }
                Effect::Pair(n, v) => {
                    self.pairs.insert(*n, *v);
                }
                Effect::Event(seq) => {
                    self.events.insert(*seq);
                }
            }
        }
    }

    /// Private items alive once `pending` (this unit's effects so far) is applied.
    fn live_items(&self, pending: &[Effect]) -> Vec<i64> {
        let mut view: BTreeMap<i64, bool> = self.items.iter().map(|(k, v)| (*k, v.is_some())).collect();
        for e in pending {
            if let Effect::Item(id, v) = e {
                view.insert(*id, v.is_some());
            }
        }
        view.into_iter()
            .filter(|(_, live)| *live)
            .map(|(k, _)| k)
            .collect()
    }
}

#[derive(Debug, Default)]
struct Report {
    task: usize,
    units_committed: u64,
    units_rolled_back: u64,
    units_failed: u64,
    statements: u64,
    errors: BTreeMap<String, u64>,
    /// Errors a correct engine never produces here (connection loss, unexpected SQLSTATEs).
    unexpected: Vec<String>,
    /// Checks that failed during the run (a private row missing on OLD).
    violations: Vec<String>,
    expected: Expected,
    /// Keys whose last unit ended in an unexpected error: outcome unknown, not checked.
    uncertain_items: BTreeSet<i64>,
    uncertain_pairs: BTreeSet<i32>,
    uncertain_events: BTreeSet<i64>,
    slowest: Duration,
}

struct Stmts {
    upd_item: Statement,
    upsert_item: Statement,
    del_item: Statement,
    ins_item: Statement,
    set_item: Statement,
    upsert_pair: Statement,
    set_pair: Statement,
    del_pair: Statement,
    bump_region: Statement,
    append: Statement,
}

struct Worker {
    task: usize,
    url: String,
    rng: StdRng,
    client: Client,
    stmts: Stmts,
    next_seq: i64,
    report: Report,
}

type PgResult<T> = Result<T, tokio_postgres::Error>;

async fn connect(url: &str) -> anyhow::Result<(Client, Stmts)> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // A safety net: a client blocked this long is a liveness bug worth a report, not a hang.
    client.batch_execute("SET statement_timeout = '20s'").await?;
    let stmts = Stmts {
        upd_item: client
            .prepare(
                "UPDATE items SET qty = qty + $2, price = $3::text::numeric, \
                 meta = jsonb_set(coalesce(meta, '{}'), '{last}', to_jsonb($4::int)), owner = $4, updated = now() \
                 WHERE id = $1",
            )
            .await?,
        upsert_item: client
            .prepare(
                "INSERT INTO items (id, qty, price, meta, tags, owner) \
                 VALUES ($1, $2, $3::text::numeric, $5::text::jsonb, $6, $4) \
                 ON CONFLICT (id) DO UPDATE SET qty = items.qty + EXCLUDED.qty, price = EXCLUDED.price, \
                 tags = EXCLUDED.tags, owner = EXCLUDED.owner, updated = now()",
            )
            .await?,
        del_item: client.prepare("DELETE FROM items WHERE id = $1").await?,
        ins_item: client
            .prepare(
                "INSERT INTO items (qty, price, meta, tags, owner) \
                 VALUES ($1, $2::text::numeric, $3::text::jsonb, $4, $5) RETURNING id",
            )
            .await?,
        set_item: client
            .prepare(
                "UPDATE items SET qty = $2, price = $3::text::numeric, tags = $4, updated = now() \
                 WHERE id = $1 AND owner = $5",
            )
            .await?,
        upsert_pair: client
            .prepare(
                "INSERT INTO pairs (region, n, val, doc, labels) VALUES ($1, $2, $3::text::numeric, $4::text::jsonb, $5) \
                 ON CONFLICT (region, n) DO UPDATE SET val = pairs.val + EXCLUDED.val, \
                 doc = pairs.doc || EXCLUDED.doc, labels = EXCLUDED.labels, at = now()",
            )
            .await?,
        set_pair: client
            .prepare(
                "INSERT INTO pairs (region, n, val, doc, labels) VALUES ($1, $2, $3::text::numeric, $4::text::jsonb, $5) \
                 ON CONFLICT (region, n) DO UPDATE SET val = EXCLUDED.val, doc = EXCLUDED.doc, \
                 labels = EXCLUDED.labels, at = now()",
            )
            .await?,
        del_pair: client
            .prepare("DELETE FROM pairs WHERE region = $1 AND n = $2")
            .await?,
        bump_region: client
            .prepare("UPDATE pairs SET val = val + 1, at = now() WHERE region = $1")
            .await?,
        append: client
            .prepare(
                "INSERT INTO events (task, seq, kind, amount, payload, tags) \
                 VALUES ($1, $2, $3, $4::text::numeric, $5::text::jsonb, $6)",
            )
            .await?,
    };
    Ok((client, stmts))
}

fn rows_affected(msgs: &[SimpleQueryMessage]) -> u64 {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .sum()
}

impl Worker {
    fn private_region(&self) -> String {
        format!("t{}", self.task)
    }

    fn simple(&mut self) -> bool {
        self.rng.gen_bool(0.4)
    }

    /// One random write; its effects on private keys go to `pending`.
    async fn write(&mut self, pending: &mut Vec<Effect>) -> PgResult<()> {
        self.report.statements += 1;
        let t = self.task as i32;
        let simple = self.simple();
        let kind = self.rng.gen_range(0..100);
        let tags = random_tags(&mut self.rng);
        let cents: i64 = self.rng.gen_range(0..100_000);
        let c = &self.client;
        let s = &self.stmts;
        match kind {
            // Shared items: update, upsert, delete.
            0..=14 => {
                let id = self.rng.gen_range(1..=SHARED_ITEMS);
                let d: i32 = self.rng.gen_range(-5..=5);
                if simple {
                    c.batch_execute(&format!(
                        "UPDATE items SET qty = qty + {d}, price = {}, meta = jsonb_set(coalesce(meta, '{{}}'), '{{last}}', to_jsonb({t})), owner = {t}, updated = now() WHERE id = {id}",
                        money(cents)
                    ))
                    .await?;
                } else {
                    c.execute(&s.upd_item, &[&id, &d, &money(cents), &t]).await?;
                }
            }
            15..=26 => {
                let id = self.rng.gen_range(1..=SHARED_ITEMS);
                let d: i32 = self.rng.gen_range(1..=3);
                let meta = format!("{{\"by\": {t}, \"k\": [{id}, {cents}]}}");
                if simple {
                    c.batch_execute(&format!(
                        "INSERT INTO items (id, qty, price, meta, tags, owner) VALUES ({id}, {d}, {}, {}::jsonb, {}, {t}) \
                         ON CONFLICT (id) DO UPDATE SET qty = items.qty + EXCLUDED.qty, price = EXCLUDED.price, \
                         tags = EXCLUDED.tags, owner = EXCLUDED.owner, updated = now()",
                        money(cents),
                        quote_literal(&meta),
                        text_array_literal(&tags)
                    ))
                    .await?;
                } else {
                    c.execute(&s.upsert_item, &[&id, &d, &money(cents), &t, &meta, &tags])
                        .await?;
                }
            }
            27..=30 => {
                let id = self.rng.gen_range(1..=SHARED_ITEMS);
                if simple {
                    c.batch_execute(&format!("DELETE FROM items WHERE id = {id}"))
                        .await?;
                } else {
                    c.execute(&s.del_item, &[&id]).await?;
                }
            }
            // Private items: serial insert, set, delete.
            31..=40 => {
                let qty: i32 = self.rng.gen_range(0..1000);
                let meta = format!("{{\"task\": {t}, \"note\": \"serial\"}}");
                let id: i64 = if simple {
                    let m = c
                        .simple_query(&format!(
                            "INSERT INTO items (qty, price, meta, tags, owner) VALUES ({qty}, {}, {}::jsonb, {}, {t}) RETURNING id",
                            money(cents),
                            quote_literal(&meta),
                            text_array_literal(&tags)
                        ))
                        .await?;
                    m.iter()
                        .find_map(|m| match m {
                            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
                            _ => None,
                        })
                        .unwrap_or(0)
                } else {
                    c.query_one(&s.ins_item, &[&qty, &money(cents), &meta, &tags, &t])
                        .await?
                        .get(0)
                };
                if id <= SHARED_ITEMS {
                    self.report
                        .violations
                        .push(format!("serial insert returned id {id}"));
                } else {
                    pending.push(Effect::Item(id, Some(qty)));
                }
            }
            41..=48 => {
                let live = self.report.expected.live_items(pending);
                if live.is_empty() {
                    return Ok(());
                }
                let id = live[self.rng.gen_range(0..live.len())];
                let delete = self.rng.gen_bool(0.3);
                let qty: i32 = self.rng.gen_range(0..1000);
                let n = match (delete, simple) {
                    (true, true) => rows_affected(
                        &c.simple_query(&format!("DELETE FROM items WHERE id = {id} AND owner = {t}"))
                            .await?,
                    ),
                    (true, false) => {
                        c.execute(
                            "DELETE FROM items WHERE id = $1 AND owner = $2",
                            &[&id, &t],
                        )
                        .await?
                    }
                    (false, true) => rows_affected(
                        &c.simple_query(&format!(
                            "UPDATE items SET qty = {qty}, price = {}, tags = {}, updated = now() WHERE id = {id} AND owner = {t}",
                            money(cents),
                            text_array_literal(&tags)
                        ))
                        .await?,
                    ),
                    (false, false) => {
                        c.execute(&s.set_item, &[&id, &qty, &money(cents), &tags, &t])
                            .await?
                    }
                };
                if n != 1 {
                    self.report.violations.push(format!(
                        "task {t}: private item {id} (committed earlier) matched {n} rows on OLD"
                    ));
                }
                pending.push(Effect::Item(id, (!delete).then_some(qty)));
            }
            // Shared pairs: accumulate, delete, bump a whole region.
            49..=62 => {
                let region = REGIONS[self.rng.gen_range(0..REGIONS.len())];
                let n = self.rng.gen_range(0..PAIRS_PER_REGION);
                let doc = format!("{{\"t{t}\": {cents}}}");
                if simple {
                    c.batch_execute(&format!(
                        "INSERT INTO pairs (region, n, val, doc, labels) VALUES ('{region}', {n}, {}, {}::jsonb, {}) \
                         ON CONFLICT (region, n) DO UPDATE SET val = pairs.val + EXCLUDED.val, \
                         doc = pairs.doc || EXCLUDED.doc, labels = EXCLUDED.labels, at = now()",
                        money(cents % 1000),
                        quote_literal(&doc),
                        text_array_literal(&tags)
                    ))
                    .await?;
                } else {
                    c.execute(&s.upsert_pair, &[&region, &n, &money(cents % 1000), &doc, &tags])
                        .await?;
                }
            }
            63..=66 => {
                let region = REGIONS[self.rng.gen_range(0..REGIONS.len())];
                let n = self.rng.gen_range(0..PAIRS_PER_REGION);
                if simple {
                    c.batch_execute(&format!(
                        "DELETE FROM pairs WHERE region = '{region}' AND n = {n}"
                    ))
                    .await?;
                } else {
                    c.execute(&s.del_pair, &[&region, &n]).await?;
                }
            }
            67..=69 => {
                let region = REGIONS[self.rng.gen_range(0..REGIONS.len())];
                if simple {
                    c.batch_execute(&format!(
                        "UPDATE pairs SET val = val + 1, at = now() WHERE region = '{region}'"
                    ))
                    .await?;
                } else {
                    c.execute(&s.bump_region, &[&region]).await?;
                }
            }
            // Private pairs: set or delete.
            70..=79 => {
                let region = self.private_region();
                let n = self.rng.gen_range(0..PRIVATE_PAIRS);
                if self.rng.gen_bool(0.25) {
                    if simple {
                        c.batch_execute(&format!(
                            "DELETE FROM pairs WHERE region = '{region}' AND n = {n}"
                        ))
                        .await?;
                    } else {
                        c.execute(&s.del_pair, &[&region, &n]).await?;
                    }
                    pending.push(Effect::Pair(n, None));
                } else {
                    let doc = format!("{{\"owner\": {t}, \"v\": {cents}}}");
                    if simple {
                        c.batch_execute(&format!(
                            "INSERT INTO pairs (region, n, val, doc, labels) VALUES ('{region}', {n}, {}, {}::jsonb, {}) \
                             ON CONFLICT (region, n) DO UPDATE SET val = EXCLUDED.val, doc = EXCLUDED.doc, \
                             labels = EXCLUDED.labels, at = now()",
                            money(cents),
                            quote_literal(&doc),
                            text_array_literal(&tags)
                        ))
                        .await?;
                    } else {
                        c.execute(&s.set_pair, &[&region, &n, &money(cents), &doc, &tags])
                            .await?;
                    }
                    pending.push(Effect::Pair(n, Some(cents)));
                }
            }
            // Appends to the keyless table.
            _ => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let kind = ["credit", "debit", "note"][self.rng.gen_range(0..3)];
                let payload = format!("{{\"task\": {t}, \"seq\": {seq}, \"s\": \"x'y\"}}");
                if simple {
                    c.batch_execute(&format!(
                        "INSERT INTO events (task, seq, kind, amount, payload, tags) VALUES ({t}, {seq}, '{kind}', {}, {}::jsonb, {})",
                        money(cents),
                        quote_literal(&payload),
                        text_array_literal(&tags)
                    ))
                    .await?;
                } else {
                    c.execute(&s.append, &[&t, &seq, &kind, &money(cents), &payload, &tags])
                        .await?;
                }
                pending.push(Effect::Event(seq));
            }
        }
        Ok(())
    }

    /// Transaction control, through the simple or the extended protocol.
    async fn control(&mut self, sql: &str) -> PgResult<()> {
        if self.simple() {
            self.client.batch_execute(sql).await
        } else {
            self.client.execute(sql, &[]).await.map(drop)
        }
    }

    /// A transaction block: writes, savepoints rolled back to or released, then COMMIT or
    /// ROLLBACK. Returns whether it committed.
    async fn transaction(&mut self, pending: &mut Vec<Effect>) -> PgResult<bool> {
        let begin = match self.rng.gen_range(0..10) {
            0 => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            1 => "START TRANSACTION",
            _ => "BEGIN",
        };
        self.control(begin).await?;
        let mut savepoints: Vec<(String, usize)> = Vec::new();
        let steps = self.rng.gen_range(1..=6);
        for step in 0..steps {
            match self.rng.gen_range(0..10) {
                0 | 1 => {
                    let name = format!("sp{step}");
                    self.control(&format!("SAVEPOINT {name}")).await?;
                    savepoints.push((name, pending.len()));
                }
                2 if !savepoints.is_empty() => {
                    let (name, mark) = savepoints.pop().unwrap_or_default();
                    if self.rng.gen_bool(0.5) {
                        self.control(&format!("ROLLBACK TO SAVEPOINT {name}")).await?;
                        pending.truncate(mark);
                        // The savepoint survives ROLLBACK TO.
                        savepoints.push((name, mark));
                    } else {
                        self.control(&format!("RELEASE SAVEPOINT {name}")).await?;
                    }
                }
                _ => {}
            }
            self.write(pending).await?;
        }
        if self.rng.gen_bool(0.15) {
            self.control("ROLLBACK").await?;
            pending.clear();
            return Ok(false);
        }
        let commit = if self.rng.gen_bool(0.2) { "END" } else { "COMMIT" };
        self.control(commit).await?;
        Ok(true)
    }

    /// Several statements in one simple-protocol string (one implicit transaction).
    async fn multi_statement(&mut self, pending: &mut Vec<Effect>) -> PgResult<()> {
        self.report.statements += 2;
        let t = self.task as i32;
        let seq = self.next_seq;
        self.next_seq += 1;
        let region = self.private_region();
        let n = self.rng.gen_range(0..PRIVATE_PAIRS);
        let cents: i64 = self.rng.gen_range(0..100_000);
        let shared = self.rng.gen_range(1..=SHARED_ITEMS);
        self.client
            .batch_execute(&format!(
                "INSERT INTO events (task, seq, kind, amount) VALUES ({t}, {seq}, 'multi', 1); \
                 INSERT INTO pairs (region, n, val) VALUES ('{region}', {n}, {}) \
                 ON CONFLICT (region, n) DO UPDATE SET val = EXCLUDED.val, doc = '{{}}', labels = '{{}}', at = now(); \
                 UPDATE items SET qty = qty + 1, owner = {t} WHERE id = {shared}",
                money(cents)
            ))
            .await?;
        pending.push(Effect::Event(seq));
        pending.push(Effect::Pair(n, Some(cents)));
        Ok(())
    }

    /// Two autocommit appends pipelined on one connection (extended protocol).
    async fn pipelined(&mut self, pending: &mut Vec<Effect>) -> PgResult<()> {
        self.report.statements += 2;
        let t = self.task as i32;
        let (a, b) = (self.next_seq, self.next_seq + 1);
        self.next_seq += 2;
        let none: Option<String> = None;
        let tags: Vec<String> = Vec::new();
        let kind = "pipelined";
        let amount = "2";
        let params_a: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&t, &a, &kind, &amount, &none, &tags];
        let params_b: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&t, &b, &kind, &amount, &none, &tags];
        let first = self.client.execute(&self.stmts.append, &params_a);
        let second = self.client.execute(&self.stmts.append, &params_b);
        let (ra, rb) = futures_util::future::join(first, second).await;
        // Each is its own transaction: record what committed, then report the first error.
        if ra.is_ok() {
            pending.push(Effect::Event(a));
        }
        if rb.is_ok() {
            pending.push(Effect::Event(b));
        }
        ra?;
        rb?;
        Ok(())
    }

    /// One unit of work: an autocommit statement, a multi-statement string, a pipeline or a
    /// transaction block.
    async fn unit(&mut self) -> anyhow::Result<()> {
        let mut pending = Vec::new();
        let started = Instant::now();
        let choice = self.rng.gen_range(0..100);
        let outcome = match choice {
            0..=44 => self.write(&mut pending).await.map(|()| true),
            45..=51 => self.multi_statement(&mut pending).await.map(|()| true),
            52..=56 => self.pipelined(&mut pending).await.map(|()| true),
            _ => self.transaction(&mut pending).await,
        };
        self.report.slowest = self.report.slowest.max(started.elapsed());
        match outcome {
            Ok(true) => {
                self.report.units_committed += 1;
                self.report.expected.apply(&pending);
            }
            Ok(false) => self.report.units_rolled_back += 1,
            Err(e) => {
                self.report.units_failed += 1;
                let in_block = choice >= 57;
                if (52..=56).contains(&choice) {
                    // Pipelined autocommit statements: those that succeeded are committed.
                    self.report.expected.apply(&pending);
                    pending.clear();
                }
                match e.as_db_error() {
                    Some(db) => {
                        let code = db.code().code().to_owned();
                        if !EXPECTED_CODES.contains(&code.as_str()) {
                            self.report.unexpected.push(format!(
                                "task {}: {code} {} (after {:?})",
                                self.task,
                                db.message(),
                                started.elapsed()
                            ));
                        }
                        *self.report.errors.entry(code).or_default() += 1;
                        if in_block {
                            self.client.batch_execute("ROLLBACK").await?;
                        }
                    }
                    None => {
                        self.report
                            .unexpected
                            .push(format!("task {}: connection error: {e}", self.task));
                        for effect in &pending {
                            match effect {
                                Effect::Item(id, _) => self.report.uncertain_items.insert(*id),
                                Effect::Pair(n, _) => self.report.uncertain_pairs.insert(*n),
                                Effect::Event(s) => self.report.uncertain_events.insert(*s),
                            };
                        }
                        let (client, stmts) = connect(&self.url).await?;
                        self.client = client;
                        self.stmts = stmts;
                    }
                }
            }
        }
        Ok(())
    }
}

async fn run_worker(task: usize, url: String, seed: u64, until: Instant) -> anyhow::Result<Report> {
    let (client, stmts) = connect(&url).await?;
    let mut w = Worker {
        task,
        url,
        rng: StdRng::seed_from_u64(seed ^ (task as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        client,
        stmts,
        next_seq: 1,
        report: Report {
            task,
            ..Report::default()
        },
    };
    while Instant::now() < until {
        w.unit().await?;
    }
    Ok(w.report)
}

/// The faults, in order, at fixed offsets from the workload's start; durations from the seed.
async fn fault_schedule(
    rng: &mut StdRng,
    fault: &FaultProxy,
    cluster: &mut TestCluster,
    start: Instant,
    log: &mut Vec<String>,
) -> anyhow::Result<()> {
    let at = |secs: f64| start + Duration::from_secs_f64(secs);
    let mut note = |what: String| {
        let line = format!("{:6.2}s {what}", start.elapsed().as_secs_f64());
        println!("chaos: {line}");
        log.push(line);
    };
    tokio::time::sleep_until(at(2.0).into()).await;
    let d = rng.gen_range(20..=100);
    fault.set_delay(Duration::from_millis(d));
    note(format!("delay {d} ms"));
    tokio::time::sleep_until(at(5.0).into()).await;
    fault.set_delay(Duration::ZERO);
    fault.reset_all();
    note(format!(
        "delay off, reset_all ({} connections)",
        fault.connections()
    ));
    tokio::time::sleep_until(at(6.5).into()).await;
    let d = rng.gen_range(20..=60);
    fault.set_delay(Duration::from_millis(d));
    note(format!("delay {d} ms"));
    tokio::time::sleep_until(at(8.5).into()).await;
    fault.set_delay(Duration::ZERO);
    let hole = rng.gen_range(1000..=2000);
    fault.set_blackhole(true);
    note(format!("blackhole for {hole} ms"));
    tokio::time::sleep(Duration::from_millis(hole)).await;
    fault.set_blackhole(false);
    note("blackhole lifted".into());
    tokio::time::sleep_until(at(12.5).into()).await;
    note("crashing NEW (SIGKILL) and starting it again".into());
    cluster.kill().await?;
    cluster.start_again().await?;
    note("NEW back".into());
    tokio::time::sleep_until(at(16.0).into()).await;
    let d = rng.gen_range(20..=100);
    fault.set_delay(Duration::from_millis(d));
    note(format!("delay {d} ms"));
    tokio::time::sleep_until(at(18.0).into()).await;
    fault.set_delay(Duration::ZERO);
    fault.reset_all();
    note("delay off, reset_all".into());
    Ok(())
}

/// Seeds the shared keys through a proxy, so they are mirrored like everything else.
async fn seed_rows(proxy: &TestProxy) -> anyhow::Result<()> {
    let c = proxy.client().await?;
    c.batch_execute(&format!(
        "INSERT INTO items (id, qty, price, meta, tags) \
         SELECT g, 10, 1.50, jsonb_build_object('seed', g), ARRAY['seed'] FROM generate_series(1, {SHARED_ITEMS}) g"
    ))
    .await?;
    c.batch_execute("SELECT setval('items_id_seq', 1000)").await?;
    let regions: Vec<String> = REGIONS.iter().map(|r| format!("'{r}'")).collect();
    c.batch_execute(&format!(
        "INSERT INTO pairs (region, n, val) SELECT r, n, 0 FROM unnest(ARRAY[{}]) r, generate_series(0, {}) n",
        regions.join(", "),
        PAIRS_PER_REGION - 1
    ))
    .await?;
    Ok(())
}

/// Values of the `mirror` object of `/status`.
async fn mirror_status(proxy: &TestProxy) -> anyhow::Result<serde_json::Value> {
    let (code, body) = proxy.admin_get("/status").await?;
    anyhow::ensure!(code == 200, "/status answered {code}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v.get("mirror").cloned().unwrap_or_default())
}

/// The value of the first sample of `name` in a Prometheus text exposition.
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']) || rest.starts_with("_total"))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Checks every acknowledged write of the tasks' private keys against OLD.
async fn check_acknowledged(env: &DualEnv, reports: &[Report]) -> anyhow::Result<Vec<String>> {
    let c = env.old.client().await?;
    let mut problems = Vec::new();
    for r in reports {
        let t = r.task as i32;
        let items: BTreeMap<i64, i32> = c
            .query(
                "SELECT id, qty FROM items WHERE owner = $1 AND id > $2",
                &[&t, &SHARED_ITEMS],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        for (id, want) in &r.expected.items {
            if r.uncertain_items.contains(id) {
                continue;
            }
            let got = items.get(id).copied();
            if got != *want {
                problems.push(format!("task {t}: item {id}: expected {want:?}, OLD has {got:?}"));
            }
        }
        let pairs: BTreeMap<i32, String> = c
            .query(
                "SELECT n, val::text FROM pairs WHERE region = $1",
                &[&format!("t{t}")],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        for (n, want) in &r.expected.pairs {
            if r.uncertain_pairs.contains(n) {
                continue;
            }
            let want = want.map(money);
            let got = pairs.get(n).cloned();
            if got != want {
                problems.push(format!(
                    "task {t}: pair (t{t}, {n}): expected {want:?}, OLD has {got:?}"
                ));
            }
        }
        let seqs: Vec<i64> = c
            .query("SELECT seq FROM events WHERE task = $1 ORDER BY seq", &[&t])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut seen = BTreeSet::new();
        for s in &seqs {
            if !seen.insert(*s) {
                problems.push(format!("task {t}: event {s} appears more than once in OLD"));
            }
        }
        for s in &r.expected.events {
            if !seen.contains(s) && !r.uncertain_events.contains(s) {
                problems.push(format!("task {t}: committed event {s} missing from OLD"));
            }
        }
        for s in &seen {
            if !r.expected.events.contains(s) && !r.uncertain_events.contains(s) {
                problems.push(format!(
                    "task {t}: event {s} in OLD but its transaction did not commit"
                ));
            }
        }
    }
    Ok(problems)
}

fn upstream_of(cluster: &TestCluster) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], cluster.port()))
}

/// The same time zone as OLD's server, so both stores render timestamptz alike.
async fn cluster_like_old() -> anyhow::Result<TestCluster> {
    let (probe, conn) = tokio_postgres::connect(&switchyard_test_support::pg_url(), NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let tz: String = probe.query_one("SHOW TimeZone", &[]).await?.get(0);
    drop(probe);
    TestCluster::start(
        ClusterOptions::default()
            .setting("timezone", tz)
            .setting("deadlock_timeout", "200ms"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_workload_under_faults_converges() -> anyhow::Result<()> {
    chaos("chaos", &Variant::default()).await
}

/// The same with the settings a careless client or a differently configured NEW bring: NEW's
/// default isolation REPEATABLE READ (the fencing relies on READ COMMITTED, which every
/// connection of the engine sets itself), and clients whose TimeZone, DateStyle, IntervalStyle
/// and float output differ from the server's (images and keys must not depend on them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_workload_converges_under_other_session_settings() -> anyhow::Result<()> {
    chaos(
        "chaos_settings",
        &Variant {
            new_isolation: Some("repeatable read"),
            client_options: Some(
                "-c TimeZone=America/St_Johns -c DateStyle=SQL,DMY -c IntervalStyle=sql_standard \
                 -c extra_float_digits=-2 -c bytea_output=escape",
            ),
        },
    )
    .await
}

/// What differs between the chaos runs.
#[derive(Default)]
struct Variant {
    /// `default_transaction_isolation` of NEW's database.
    new_isolation: Option<&'static str>,
    /// `options` every client connects with.
    client_options: Option<&'static str>,
}

async fn chaos(label: &str, variant: &Variant) -> anyhow::Result<()> {
    let seed = seed();
    println!("chaos: seed {seed} (SWITCHYARD_CHAOS_SEED={seed} replays it)");
    let test_started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);

    let mut cluster = cluster_like_old().await?;
    let env = DualEnv::new_with_new_admin(label, SCHEMA, tables(), &cluster.url("postgres")).await?;
    if let Some(level) = variant.new_isolation {
        env.new
            .execute_batch(&format!(
                "ALTER DATABASE {} SET default_transaction_isolation = '{level}'",
                env.new.name()
            ))
            .await?;
    }
    env.old
        .execute_batch(&format!(
            "ALTER DATABASE {} SET deadlock_timeout = '200ms'",
            env.old.name()
        ))
        .await
        .ok();
    let fault = FaultProxy::start(upstream_of(&cluster)).await?;
    let mirror = [
        ("timeout_ms", 500),
        ("repair_interval_ms", 200),
        ("stale_intent_secs", 5),
        ("pool_size", 8),
    ];
    let config = env.proxy_config_with_mirror(&env.follower_url_via(fault.addr()), &mirror);
    let proxies = [TestProxy::start(&config).await?, TestProxy::start(&config).await?];
    seed_rows(&proxies[0]).await?;
    env.wait_for_no_intents(Duration::from_secs(10)).await?;
    env.assert_converged().await?;
    println!("chaos: setup took {:?}", test_started.elapsed());

    let start = Instant::now();
    let until = start + WORKLOAD;
    let workers: Vec<_> = (0..TASKS)
        .map(|task| {
            let mut url = proxies[task % 2].url("postgres");
            if let Some(options) = variant.client_options {
                url.push_str("&options=");
                url.push_str(&options.split_whitespace().collect::<Vec<_>>().join("%20"));
            }
            tokio::spawn(run_worker(task, url, seed, until))
        })
        .collect();
    let mut faults = Vec::new();
    fault_schedule(&mut rng, &fault, &mut cluster, start, &mut faults).await?;

    let mut reports = Vec::new();
    for w in workers {
        let report = tokio::time::timeout(Duration::from_secs(45), w)
            .await
            .map_err(|_| anyhow::anyhow!("a client task did not finish 45 s after its deadline"))???;
        reports.push(report);
    }
    let workload_took = start.elapsed();
    fault.set_delay(Duration::ZERO);
    fault.set_blackhole(false);
    fault.set_refuse(false);

    let drain_started = Instant::now();
    let intents_at_end = env.pending_intents().await?;
    let drained = env.wait_for_no_intents(Duration::from_secs(50)).await;
    let drain_took = drain_started.elapsed();

    // What the clients did and saw.
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut committed, mut rolled_back, mut failed, mut statements) = (0, 0, 0, 0);
    let mut slowest = Duration::ZERO;
    for r in &reports {
        committed += r.units_committed;
        rolled_back += r.units_rolled_back;
        failed += r.units_failed;
        statements += r.statements;
        slowest = slowest.max(r.slowest);
        for (code, n) in &r.errors {
            *errors.entry(code.clone()).or_default() += n;
        }
    }
    println!(
        "chaos: {TASKS} clients ran {workload_took:?}: {statements} statements, {committed} units committed, \
         {rolled_back} rolled back, {failed} failed {errors:?}; slowest unit {slowest:?}"
    );
    println!("chaos: {intents_at_end} intents at the end of the workload, drained in {drain_took:?}");
    let mut statuses = Vec::new();
    for (i, p) in proxies.iter().enumerate() {
        let status = format!("proxy {i} /status mirror: {}", mirror_status(p).await?);
        println!("chaos: {status}");
        statuses.push(status);
    }
    for (table, old, new) in env.row_counts().await? {
        println!("chaos: {table}: {old} rows on OLD, {new} on NEW");
    }

    let unexpected: Vec<&String> = reports.iter().flat_map(|r| &r.unexpected).collect();
    let violations: Vec<&String> = reports.iter().flat_map(|r| &r.violations).collect();
    drained.map_err(|e| {
        anyhow::anyhow!(
            "seed {seed}: {e} (repairs stuck? see the proxies' repair_failures and their \
             'repair round failed' warnings)\n  {}\nfaults:\n  {}",
            statuses.join("\n  "),
            faults.join("\n  ")
        )
    })?;
    env.assert_converged()
        .await
        .map_err(|e| anyhow::anyhow!("seed {seed}: {e}\nfaults:\n  {}", faults.join("\n  ")))?;
    assert!(
        unexpected.is_empty(),
        "seed {seed}: errors a client should never see: {unexpected:#?}"
    );
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
    let lost = check_acknowledged(&env, &reports).await?;
    assert!(
        lost.is_empty(),
        "seed {seed}: acknowledged writes not in OLD: {lost:#?}"
    );
    assert!(
        committed > 200,
        "seed {seed}: the workload barely ran ({committed} units)"
    );

    // The proxies say what happened: failures while NEW was unreachable, then repairs.
    let (mut failures, mut repairs) = (0.0, 0.0);
    for p in &proxies {
        let (code, body) = p.admin_get("/metrics").await?;
        assert_eq!(code, 200, "{body}");
        for name in [
            "switchyard_mirrored_transactions",
            "switchyard_mirror_failures",
            "switchyard_repairs",
            "switchyard_repairs_pending",
        ] {
            assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
        }
        failures += metric(&body, "switchyard_mirror_failures").unwrap_or(0.0);
        repairs += metric(&body, "switchyard_repairs").unwrap_or(0.0);
    }
    println!("chaos: /metrics: {failures} mirror failures, {repairs} repairs");
    assert!(
        failures > 0.0,
        "faults on NEW's link but no mirror failure counted"
    );
    assert!(repairs > 0.0, "mirror failures but no repair counted");
    let deadline = Instant::now() + Duration::from_secs(5);
    for p in &proxies {
        loop {
            let pending = mirror_status(p).await?["pending_repairs"].as_i64();
            if pending == Some(0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "/status still reports {pending:?} pending repairs"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(proxies);
    println!("chaos: whole test {:?}", test_started.elapsed());
    Ok(())
}

/// Backends on OLD's database matching `filter` (an SQL condition on pg_stat_activity).
async fn old_backends(env: &DualEnv, filter: &str) -> anyhow::Result<i64> {
    let c = env.old.client().await?;
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND {filter}"
    );
    Ok(c.query_one(&sql, &[]).await?.get(0))
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    while !check().await? {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A proxy that dies inside the commit sequence leaves an intent nobody in memory remembers.
/// Three points of death, each simulated by stopping the proxy and killing the connections a
/// dead process would lose (its NEW connections by resetting the link, its OLD bookkeeping
/// connections by terminating their backends):
///
/// - A: the images never reached NEW (link partitioned), OLD committed;
/// - B: the images are applied in an open NEW transaction, OLD committed, COMMIT on NEW lost;
/// - C: NEW committed too, but the intent was not yet deleted (a repair must not apply twice:
///   the append-only row would be duplicated).
///
/// Each client heard COMMIT. A fresh proxy repairs the stale intents and the stores converge.
/// (The amounts have no trailing zeros on purpose: see
/// `repaired_append_only_rows_keep_exact_numerics` for what repairs do to those.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_of_a_dead_proxy_are_repaired_by_another() -> anyhow::Result<()> {
    let env = DualEnv::new("dead_proxy", SCHEMA, tables()).await?;
    let fault = FaultProxy::start(server_of(env.new.url())).await?;
    // The link is slowed to 150 ms per message below, and C's mirror must reconnect within the
    // 1.5 s mirror timeout: a TLS handshake's extra round trips (sslmode=prefer, libpq's
    // default) would not fit. This test is about dead proxies, not TLS: plain text.
    let new_url = env.follower_url_via(fault.addr());
    let new_url = format!(
        "{new_url}{}sslmode=disable",
        if new_url.contains('?') { '&' } else { '?' }
    );
    // The first proxy never repairs anything: it is the one that dies.
    let doomed = TestProxy::start(&env.proxy_config_with_mirror(
        &new_url,
        &[
            ("timeout_ms", 1500),
            ("repair_interval_ms", 3_600_000),
            ("stale_intent_secs", 3600),
        ],
    ))
    .await?;
    seed_rows(&doomed).await?;
    env.wait_for_no_intents(Duration::from_secs(10)).await?;
    env.assert_converged().await?;
    let c = doomed.client().await?;

    // B: the intent INSERT on OLD waits behind our table lock, so the images are already applied
    // on NEW; the link goes dark before the proxy sends COMMIT to NEW.
    let mut lock_holder = env.old.client().await?;
    let lock = lock_holder.transaction().await?;
    lock.batch_execute("LOCK TABLE switchyard.switchyard_intents IN SHARE MODE")
        .await?;
    c.batch_execute(
        "BEGIN; INSERT INTO items (id, qty, price, owner) VALUES (2001, 1, 1.10, 99); \
         UPDATE pairs SET val = val + 5 WHERE region = 'eu' AND n = 1; \
         INSERT INTO events (task, seq, kind, amount) VALUES (99, 2, 'b', 2.75)",
    )
    .await?;
    let commit_b = tokio::spawn(async move {
        let started = Instant::now();
        let r = c.batch_execute("COMMIT").await;
        (c, r, started.elapsed())
    });
    wait_until(
        "the intent INSERT waits for our lock",
        Duration::from_secs(10),
        || {
            old_backends(
                &env,
                "wait_event_type = 'Lock' AND query LIKE '%switchyard_intents%'",
            )
            .map(|n| n.map(|n| n > 0))
        },
    )
    .await?;
    fault.set_blackhole(true);
    lock.commit().await?;
    let (c, committed, took) = commit_b.await?;
    committed?;
    println!("dead_proxy: B's client heard COMMIT after {took:?}");
    assert!(
        took >= Duration::from_millis(1400),
        "B should have waited for the mirror timeout"
    );

    // A: NEW still unreachable; the images never get there.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    // Statement by statement, so the COMMIT goes through the proxy's commit sequence (a string
    // with its own COMMIT would be recorded by OLD's capture trigger instead).
    for sql in [
        "BEGIN",
        "INSERT INTO items (id, qty, price, owner) VALUES (2002, 2, 2.20, 99)",
        "DELETE FROM pairs WHERE region = 'eu' AND n = 2",
        "INSERT INTO events (task, seq, kind, amount) VALUES (99, 1, 'a', 1.25)",
        "COMMIT",
    ] {
        c.batch_execute(sql).await?;
    }
    println!(
        "dead_proxy: A's client heard COMMIT after {:?}",
        started.elapsed()
    );
    // What a dead process loses first: its connections to NEW (B's open transaction aborts).
    fault.reset_all();
    fault.set_blackhole(false);
    // The proxy treats NEW as down for a second after a failure; C must mirror normally.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // C: NEW commits, then the proxy dies before deleting the intent: we hold the intent row so
    // the cleanup's DELETE waits.
    fault.set_delay(Duration::from_millis(150));
    let poller = env.old.client().await?;
    let c_commit = tokio::spawn(async move {
        let mut r = Ok(());
        for sql in [
            "BEGIN",
            "INSERT INTO items (id, qty, price, owner) VALUES (2003, 3, 3.30, 99)",
            "UPDATE items SET qty = 77 WHERE id = 5",
            "INSERT INTO events (task, seq, kind, amount) VALUES (99, 3, 'c', 3.5)",
            "COMMIT",
        ] {
            r = c.batch_execute(sql).await;
            if r.is_err() {
                break;
            }
        }
        (c, r)
    });
    let mut held = false;
    for _ in 0..2000 {
        poller.batch_execute("BEGIN").await?;
        let n = poller
            .query("SELECT id FROM switchyard.switchyard_intents FOR SHARE", &[])
            .await?
            .len();
        // A and B are there already; C's makes three.
        if n >= 3 {
            held = true;
            break;
        }
        poller.batch_execute("ROLLBACK").await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(held, "C's intent never appeared");
    let (c, r) = c_commit.await?;
    r?;
    wait_until(
        "the cleanup's DELETE waits for our row lock",
        Duration::from_secs(10),
        || {
            old_backends(
                &env,
                "application_name = 'switchyard-repair' AND wait_event_type = 'Lock'",
            )
            .map(|n| n.map(|n| n > 0))
        },
    )
    .await?;
    fault.set_delay(Duration::ZERO);

    // The proxy dies: its sessions, its OLD connections, its NEW connections.
    drop(c);
    doomed.stop().await?;
    env.old
        .client()
        .await?
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'switchyard-repair'",
            &[],
        )
        .await?;
    fault.reset_all();
    poller.batch_execute("ROLLBACK").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(env.pending_intents().await?, 3, "A, B and C are in doubt");
    let new = env.new.client().await?;
    let on_new: Vec<i64> = new
        .query("SELECT id FROM items WHERE id > 2000 ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(on_new, vec![2003], "only C reached NEW");

    // A fresh proxy takes over the stale intents.
    let heir = TestProxy::start(&env.proxy_config_with_mirror(
        &new_url,
        &[
            ("timeout_ms", 500),
            ("repair_interval_ms", 100),
            ("stale_intent_secs", 1),
        ],
    ))
    .await?;
    let started = Instant::now();
    env.wait_for_no_intents(Duration::from_secs(20)).await?;
    println!(
        "dead_proxy: the new proxy settled the intents in {:?}",
        started.elapsed()
    );
    env.assert_converged().await?;
    let events: i64 = new
        .query_one("SELECT count(*) FROM events WHERE task = 99", &[])
        .await?
        .get(0);
    assert_eq!(events, 3, "each append exactly once on NEW");
    let status = mirror_status(&heir).await?;
    println!("dead_proxy: new proxy /status mirror: {status}");
    assert!(
        status["repairs"].as_u64().unwrap_or(0) >= 2,
        "A and B re-copied: {status}"
    );
    Ok(())
}

// ---- minimal reproductions of engine bugs found by the chaos test ----

const KV_SCHEMA: &str = "CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL);";

/// OLD and NEW on the shared server, a [`FaultProxy`] in front of NEW, one proxy.
async fn kv_env(label: &str, mirror: &[(&str, u64)]) -> anyhow::Result<(DualEnv, FaultProxy, TestProxy)> {
    let env = DualEnv::new(label, KV_SCHEMA, vec![DualTable::new("kv")]).await?;
    let fault = FaultProxy::start(server_of(env.new.url())).await?;
    let proxy =
        TestProxy::start(&env.proxy_config_with_mirror(&env.follower_url_via(fault.addr()), mirror)).await?;
    Ok((env, fault, proxy))
}

async fn new_value(env: &DualEnv, k: i32) -> anyhow::Result<Option<String>> {
    Ok(env
        .new
        .client()
        .await?
        .query_opt("SELECT v FROM kv WHERE k = $1", &[&k])
        .await?
        .map(|r| r.get(0)))
}

/// A transaction that writes a key and then deletes it used to record the key twice in its
/// intent. If that intent must be repaired (NEW was unreachable at commit), the repair re-reads
/// the keys on OLD, finds the key gone and deletes it on NEW with both copies in one
/// `INSERT ... ON CONFLICT DO UPDATE` on the keys table, which PostgreSQL refuses (21000,
/// "ON CONFLICT DO UPDATE command cannot affect row a second time"). The repair round fails, is
/// retried with backoff, fails again, forever, and since intents are repaired oldest first, no
/// later intent of any proxy is repaired either: NEW never converges.
///
/// Found by the chaos test and fixed: `intent_sql` and `repair_intent` list such a key once, and
/// one failing intent no longer holds up the rest of a repair round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_of_a_key_written_then_deleted_in_one_transaction() -> anyhow::Result<()> {
    let (env, fault, proxy) = kv_env(
        "bug_dupkey",
        &[
            ("timeout_ms", 300),
            ("repair_interval_ms", 100),
            ("stale_intent_secs", 1),
        ],
    )
    .await?;
    let c = proxy.client().await?;
    c.batch_execute("INSERT INTO kv VALUES (1, 'mirrored')").await?;
    env.assert_converged().await?;
    // Its intent goes once NEW's WAL is flushed past the commit.
    env.wait_for_no_intents(Duration::from_secs(5)).await?;

    // NEW unreachable: the next transactions commit on OLD and leave intents for repair.
    fault.reset_all();
    fault.set_refuse(true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for sql in [
        "BEGIN",
        "INSERT INTO kv VALUES (2, 'short-lived')",
        "DELETE FROM kv WHERE k = 2",
        "COMMIT",
    ] {
        c.batch_execute(sql).await?;
    }
    c.batch_execute("INSERT INTO kv VALUES (3, 'later')").await?;
    assert_eq!(env.pending_intents().await?, 2);
    fault.set_refuse(false);

    let drained = env.wait_for_no_intents(Duration::from_secs(15)).await;
    let (_, body) = proxy.admin_get("/status").await?;
    println!("bug_dupkey: /status {body}");
    drained.map_err(|e| anyhow::anyhow!("{e}; /status: {body}"))?;
    env.assert_converged().await?;
    Ok(())
}

/// An apply that outlives the mirror timeout (here: NEW holds the row lock for a second) is
/// abandoned: its connection must never be committed, reused or returned to a pool inside the
/// open transaction (where a repair would meet the transaction's own applied marker, take it
/// for "already applied", roll back and delete the intent: the write lost). The client hears
/// COMMIT after the timeout, the intent is repaired once the lock is gone, the stores converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_that_times_out_behind_a_lock_is_abandoned() -> anyhow::Result<()> {
    let (env, _fault, proxy) = kv_env(
        "abandoned_apply",
        &[
            ("timeout_ms", 300),
            ("repair_interval_ms", 100),
            ("stale_intent_secs", 30),
            ("pool_size", 1),
        ],
    )
    .await?;
    let c = proxy.client().await?;
    c.batch_execute("INSERT INTO kv VALUES (1, 'v1')").await?;
    env.wait_for_no_intents(Duration::from_secs(5)).await?;
    env.assert_converged().await?;

    // Something on NEW holds the row (another writer, a backfill, a DBA).
    let mut holder = env.new.client().await?;
    let lock = holder.transaction().await?;
    lock.execute("SELECT 1 FROM kv WHERE k = 1 FOR UPDATE", &[])
        .await?;
    let started = Instant::now();
    c.batch_execute("UPDATE kv SET v = 'v2' WHERE k = 1").await?;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "the client waits for the mirror timeout, not for NEW's lock: {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    lock.commit().await?;

    env.wait_for_no_intents(Duration::from_secs(15)).await?;
    env.assert_converged().await?;
    assert_eq!(new_value(&env, 1).await?.as_deref(), Some("v2"));
    let open: i64 = env
        .new
        .client()
        .await?
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'switchyard-mirror' AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        open, 0,
        "a mirror connection was left inside a transaction on NEW"
    );
    // Later writes still mirror directly.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.batch_execute("UPDATE kv SET v = 'v3' WHERE k = 1").await?;
    env.wait_for_no_intents(Duration::from_secs(5)).await?;
    env.assert_converged().await?;
    Ok(())
}

/// For a table without a key the intent carries the appended rows themselves, and `intent_sql`
/// builds it by parsing each row image into a `serde_json::Value`, whose numbers were `f64`. A
/// `numeric` loses its scale (274.90 becomes 274.9) and every digit beyond an `f64`'s ~17, so the
/// rows a repair appends on NEW differ from OLD's. Mirrored directly (no repair) they are exact.
///
/// Fixed with serde_json's `arbitrary_precision` feature (the workspace's `Cargo.toml`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repaired_append_only_rows_keep_exact_numerics() -> anyhow::Result<()> {
    let env = DualEnv::new(
        "bug_numeric",
        "CREATE TABLE ledger (amount numeric NOT NULL, big numeric, note text);",
        vec![DualTable::new("ledger")],
    )
    .await?;
    let fault = FaultProxy::start(server_of(env.new.url())).await?;
    let proxy = TestProxy::start(&env.proxy_config_with_mirror(
        &env.follower_url_via(fault.addr()),
        &[
            ("timeout_ms", 300),
            ("repair_interval_ms", 100),
            ("stale_intent_secs", 1),
        ],
    ))
    .await?;
    let c = proxy.client().await?;
    let rows = "('274.90', 12345678901234567890.5, 'scale'), \
                ('0.12345678901234567890123', NULL, 'precision'), \
                ('1e-30', 9007199254740993, 'tiny and 2^53+1')";
    c.batch_execute(&format!("INSERT INTO ledger VALUES {rows}"))
        .await?;
    env.wait_for_no_intents(Duration::from_secs(5)).await?;
    env.assert_converged().await?; // the direct mirror is exact

    fault.reset_all();
    fault.set_refuse(true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.batch_execute(&format!("INSERT INTO ledger VALUES {rows}"))
        .await?;
    fault.set_refuse(false);
    env.wait_for_no_intents(Duration::from_secs(15)).await?;
    env.assert_converged().await?;
    Ok(())
}
