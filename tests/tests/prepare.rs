//! `prepare` against real databases: OLD and NEW are two fresh databases on the local server.
//! Matching tables get their side objects (exact columns checked from the catalogs, twice to show
//! idempotence); every kind of mismatch is reported in one run and nothing is created; keyless
//! tables, configured keys, long names, composite/uuid/text keys, quoted names, partitioned
//! tables and a changed key.

use anyhow::Context;
use sqlx::postgres::{PgPool, PgPoolOptions};
use switchyard_config::{Phase, TableName, TableSettings, UncapturedPolicy};
use switchyard_store::{keys_table_name, prepare, PrepareReport, StoreError};
use switchyard_test_support::TestDb;

/// OLD and NEW, each with a pool.
struct Pair {
    old: TestDb,
    new: TestDb,
    old_pool: PgPool,
    new_pool: PgPool,
}

impl Pair {
    /// Two databases, `old_sql` run on OLD and `new_sql` on NEW.
    async fn create(label: &str, old_sql: &str, new_sql: &str) -> anyhow::Result<Pair> {
        let (old, new) = TestDb::create_pair(label).await?;
        old.execute_batch(old_sql).await?;
        new.execute_batch(new_sql).await?;
        let old_pool = pool(&old).await?;
        let new_pool = pool(&new).await?;
        Ok(Pair {
            old,
            new,
            old_pool,
            new_pool,
        })
    }

    /// Both stores with the same tables.
    async fn same(label: &str, sql: &str) -> anyhow::Result<Pair> {
        Self::create(label, sql, sql).await
    }

    async fn prepare(&self, tables: &[TableSettings], apply: bool) -> Result<PrepareReport, StoreError> {
        prepare(&self.old_pool, &self.new_pool, tables, apply).await
    }
}

async fn pool(db: &TestDb) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(db.url())
        .await
        .with_context(|| format!("connecting to {}", db.name()))
}

/// A `[[tables]]` entry for `name` with configured `key` columns (empty: the primary key).
fn table(name: &str, key: &[&str]) -> TableSettings {
    table_named(name.parse().unwrap(), key)
}

/// As [`table`], for names the config syntax does not allow (spaces) but PostgreSQL does.
fn table_named(name: TableName, key: &[&str]) -> TableSettings {
    TableSettings {
        name,
        phase: Phase::DualWrite,
        read_share: 0,
        shadow_share: 0,
        key: key.iter().map(|k| k.to_string()).collect(),
        on_uncaptured: UncapturedPolicy::Refuse,
        group: None,
    }
}

/// A table's columns as `name type [NOT NULL] [DEFAULT expr]`, read from the catalogs
/// independently of the store crate. Empty when the table does not exist.
async fn columns(db: &TestDb, table: &str) -> Vec<String> {
    let client = db.client().await.unwrap();
    let rows = client
        .query(
            "SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod) \
                    || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END \
                    || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '') \
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = to_regclass($1::text) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&table],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// The table's primary key as `pg_get_constraintdef` writes it.
async fn primary_key(db: &TestDb, table: &str) -> Option<String> {
    let client = db.client().await.unwrap();
    client
        .query_opt(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = to_regclass($1::text) AND contype = 'p'",
            &[&table],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn has_side_schema(db: &TestDb) -> bool {
    let client = db.client().await.unwrap();
    client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'switchyard'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 1
}

/// `switchyard_tables` rows as `table_name|keys_table|{key,columns}`.
async fn registered(new: &TestDb) -> Vec<String> {
    let client = new.client().await.unwrap();
    let rows = client
        .query(
            "SELECT table_name || '|' || coalesce(keys_table, '-') || '|' || key_columns::text \
             FROM switchyard.switchyard_tables ORDER BY table_name",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

fn messages(report: &PrepareReport) -> Vec<String> {
    report.mismatches.iter().map(ToString::to_string).collect()
}

const SHOP: &str = "
    CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL, balance numeric(12,2) DEFAULT 0);
    CREATE TABLE history (at timestamptz NOT NULL DEFAULT now(), line text);
";

#[tokio::test]
async fn identical_tables_get_exact_side_tables_and_prepare_is_idempotent() {
    let db = Pair::same("prep_same", SHOP).await.unwrap();
    let tables = [table("accounts", &[]), table("public.history", &[])];

    let checked = db.prepare(&tables, false).await.unwrap();
    assert!(checked.is_ready(), "{:?}", messages(&checked));
    assert!(
        !has_side_schema(&db.old).await && !has_side_schema(&db.new).await,
        "check creates nothing"
    );

    for run in 0..2 {
        let report = db.prepare(&tables, true).await.unwrap();
        assert!(report.mismatches.is_empty(), "run {run}: {:?}", messages(&report));
        let [accounts, history] = &report.tables[..] else {
            panic!("{:?}", report.tables)
        };
        assert_eq!(accounts.key, ["id"]);
        assert_eq!(
            accounts.keys_table.as_deref(),
            Some("switchyard_keys_public_accounts")
        );
        assert_eq!(accounts.old.primary_key, ["id"]);
        assert!(history.key.is_empty() && history.keys_table.is_none());
    }

    assert_eq!(
        columns(&db.new, "switchyard.switchyard_tables").await,
        [
            "table_name text NOT NULL",
            "keys_table text",
            "key_columns text[] NOT NULL",
            "prepared_at timestamp with time zone NOT NULL DEFAULT now()",
        ]
    );
    assert_eq!(
        primary_key(&db.new, "switchyard.switchyard_tables")
            .await
            .as_deref(),
        Some("PRIMARY KEY (table_name)")
    );
    assert_eq!(
        columns(&db.new, "switchyard.switchyard_keys_public_accounts").await,
        [
            "id bigint NOT NULL",
            "sy_version bigint NOT NULL",
            "sy_deleted boolean NOT NULL DEFAULT false",
            "sy_updated_at timestamp with time zone NOT NULL DEFAULT now()",
        ]
    );
    assert_eq!(
        primary_key(&db.new, "switchyard.switchyard_keys_public_accounts")
            .await
            .as_deref(),
        Some("PRIMARY KEY (id)")
    );
    assert_eq!(
        columns(&db.new, "switchyard.switchyard_applied").await,
        [
            "intent_id bigint NOT NULL",
            "applied_at timestamp with time zone NOT NULL DEFAULT now()",
        ]
    );
    assert_eq!(
        primary_key(&db.new, "switchyard.switchyard_applied")
            .await
            .as_deref(),
        Some("PRIMARY KEY (intent_id)")
    );
    assert_eq!(
        columns(&db.old, "switchyard.switchyard_intents").await,
        [
            "id bigint NOT NULL",
            "created_at timestamp with time zone NOT NULL DEFAULT now()",
            "proxy text NOT NULL",
            "changes jsonb NOT NULL",
        ]
    );
    assert_eq!(
        primary_key(&db.old, "switchyard.switchyard_intents")
            .await
            .as_deref(),
        Some("PRIMARY KEY (id)")
    );
    assert_eq!(
        columns(&db.old, "switchyard.switchyard_verify").await,
        [
            "table_name text NOT NULL",
            "reason text NOT NULL",
            "marked_at timestamp with time zone NOT NULL DEFAULT now()",
        ]
    );
    assert_eq!(
        primary_key(&db.old, "switchyard.switchyard_verify")
            .await
            .as_deref(),
        Some("PRIMARY KEY (table_name)")
    );
    assert_eq!(
        columns(&db.old, "switchyard.switchyard_capture_boundary").await,
        [
            "table_name text NOT NULL",
            "snapshot pg_snapshot NOT NULL",
            "blocks bigint NOT NULL",
            "filenode oid",
            "recorded_at timestamp with time zone NOT NULL DEFAULT now()",
        ]
    );
    // Each side table lives on its own store only.
    assert!(columns(&db.old, "switchyard.switchyard_tables").await.is_empty());
    assert!(columns(&db.new, "switchyard.switchyard_intents").await.is_empty());
    assert_eq!(
        registered(&db.new).await,
        [
            "public.accounts|switchyard_keys_public_accounts|{id}",
            "public.history|-|{}",
        ]
    );
}

#[tokio::test]
async fn every_mismatch_is_reported_in_one_run_and_nothing_is_created() {
    let old = "
        CREATE TABLE accounts (id integer PRIMARY KEY, email text, nickname text, score integer);
        CREATE TABLE orders (id bigint PRIMARY KEY, total numeric, placed date);
        CREATE TABLE events (code text, payload jsonb);
        CREATE TABLE plain (id int PRIMARY KEY, doubled int);
        CREATE TABLE only_old (id int PRIMARY KEY);
    ";
    let new = "
        -- email missing, score bigint, nickname NOT NULL, new NOT NULL column without default;
        -- extra nullable, defaulted and identity columns are fine.
        CREATE TABLE accounts (id integer PRIMARY KEY, nickname text NOT NULL, score bigint,
            tier text NOT NULL, note text, created timestamptz NOT NULL DEFAULT now(),
            seq bigint GENERATED ALWAYS AS IDENTITY);
        -- no primary key or unique index on id; the unique index on total is partial.
        CREATE TABLE orders (id bigint NOT NULL, total numeric, placed date);
        CREATE UNIQUE INDEX ON orders (id) WHERE total > 0;
        CREATE TABLE events (code text NOT NULL UNIQUE, payload jsonb);
        CREATE TABLE plain (id int PRIMARY KEY, doubled int GENERATED ALWAYS AS (id * 2) STORED);
        CREATE TABLE only_new (id int PRIMARY KEY);
    ";
    let db = Pair::create("prep_bad", old, new).await.unwrap();
    let tables = [
        table("accounts", &[]),
        table("orders", &[]),
        // code is nullable on OLD; nope exists nowhere.
        table("events", &["code", "nope"]),
        table("plain", &[]),
        table("only_old", &[]),
        table("only_new", &[]),
    ];
    let report = db.prepare(&tables, true).await.unwrap();
    let found = messages(&report);
    let expected = [
        "public.accounts: column \"email\" exists on OLD but not on NEW",
        "public.accounts: column \"nickname\" is NOT NULL on NEW but nullable on OLD",
        "public.accounts: column \"score\" has type integer on OLD and bigint on NEW",
        "public.accounts: column \"tier\" exists only on NEW and is NOT NULL without a default",
        "public.orders: NEW has no primary key or unique index on exactly (id)",
        "public.events: key column \"code\" is nullable on OLD",
        "public.events: key column \"nope\" does not exist on OLD",
        "public.events: key column \"nope\" does not exist on NEW",
        "public.events: NEW has no primary key or unique index on exactly (code, nope)",
        "public.plain: column \"doubled\" is generated on NEW but a plain column on OLD",
        "public.only_old: table does not exist on NEW",
        "public.only_new: table does not exist on OLD",
    ];
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    for (f, e) in found.iter().zip(expected) {
        assert!(f.starts_with(e), "{f:?} should start with {e:?}\nall: {found:#?}");
    }
    assert_eq!(
        report.tables.len(),
        4,
        "tables on both stores are still described"
    );
    assert!(
        !has_side_schema(&db.old).await && !has_side_schema(&db.new).await,
        "nothing created"
    );
}

#[tokio::test]
async fn keyless_table_with_and_without_a_configured_key() {
    let sql = "CREATE TABLE audit (event_id uuid NOT NULL, at timestamptz NOT NULL, what text);
               CREATE UNIQUE INDEX audit_event ON audit (event_id);";
    let db = Pair::same("prep_keyless", sql).await.unwrap();

    let report = db.prepare(&[table("audit", &[])], true).await.unwrap();
    assert!(report.is_ready(), "{:?}", messages(&report));
    assert!(report.tables[0].key.is_empty() && report.tables[0].keys_table.is_none());
    assert_eq!(report.tables[0].old.unique_keys, [["event_id"]]);
    assert!(columns(&db.new, "switchyard.switchyard_keys_public_audit")
        .await
        .is_empty());
    assert_eq!(registered(&db.new).await, ["public.audit|-|{}"]);

    // The same table with a configured key: now keyed, and the registration is updated.
    let report = db.prepare(&[table("audit", &["event_id"])], true).await.unwrap();
    assert!(report.is_ready(), "{:?}", messages(&report));
    assert_eq!(report.tables[0].key, ["event_id"]);
    assert_eq!(
        columns(&db.new, "switchyard.switchyard_keys_public_audit").await[0],
        "event_id uuid NOT NULL"
    );
    assert_eq!(
        registered(&db.new).await,
        ["public.audit|switchyard_keys_public_audit|{event_id}"]
    );
}

#[tokio::test]
async fn long_table_name_gets_a_keys_table_of_at_most_63_bytes() {
    let long = format!("t{}", "x".repeat(62));
    let db = Pair::same("prep_long", &format!("CREATE TABLE {long} (id int PRIMARY KEY)"))
        .await
        .unwrap();
    let report = db.prepare(&[table(&long, &[])], true).await.unwrap();
    assert!(report.is_ready(), "{:?}", messages(&report));
    let keys_table = report.tables[0].keys_table.clone().unwrap();
    assert!(keys_table.len() <= 63, "{keys_table}");
    assert_eq!(
        keys_table,
        keys_table_name(&TableName::new("public", long.as_str()))
    );
    assert!(
        keys_table.starts_with("switchyard_keys_public_txxx"),
        "{keys_table}"
    );
    // PostgreSQL kept the name as given (not truncated), so the proxy finds it by this name.
    assert_eq!(
        columns(&db.new, &format!("switchyard.{keys_table}")).await[0],
        "id integer NOT NULL"
    );
}

#[tokio::test]
async fn composite_uuid_text_and_quoted_keys() {
    let sql = r#"
        CREATE SCHEMA "Sales";
        CREATE TABLE "Sales"."Order Items" ("Tenant" uuid, "Line No" integer, sku varchar(32) NOT NULL,
            qty int, PRIMARY KEY ("Tenant", "Line No"));
        CREATE TABLE tags (name text PRIMARY KEY);
        CREATE TABLE readings (site varchar(20), at timestamptz, v float8, PRIMARY KEY (site, at))
            PARTITION BY RANGE (at);
        CREATE TABLE readings_all PARTITION OF readings DEFAULT;
    "#;
    let db = Pair::same("prep_keys", sql).await.unwrap();
    let tables = [
        table_named(TableName::new("Sales", "Order Items"), &[]),
        table("tags", &[]),
        table("readings", &[]),
    ];
    let report = db.prepare(&tables, true).await.unwrap();
    assert!(report.is_ready(), "{:?}", messages(&report));
    assert_eq!(report.tables[0].key, ["Tenant", "Line No"]);
    assert_eq!(
        columns(&db.new, r#"switchyard."switchyard_keys_Sales_Order Items""#).await[..2],
        ["Tenant uuid NOT NULL", "Line No integer NOT NULL"]
    );
    assert_eq!(
        primary_key(&db.new, r#"switchyard."switchyard_keys_Sales_Order Items""#)
            .await
            .as_deref(),
        Some(r#"PRIMARY KEY ("Tenant", "Line No")"#)
    );
    assert_eq!(
        columns(&db.new, "switchyard.switchyard_keys_public_tags").await[0],
        "name text NOT NULL"
    );
    assert_eq!(
        columns(&db.new, "switchyard.switchyard_keys_public_readings").await[..2],
        [
            "site character varying(20) NOT NULL",
            "at timestamp with time zone NOT NULL"
        ]
    );
}

#[tokio::test]
async fn a_changed_key_is_reported_and_its_keys_table_left_alone() {
    let sql = "CREATE TABLE items (id int PRIMARY KEY, code text NOT NULL UNIQUE)";
    let db = Pair::same("prep_rekey", sql).await.unwrap();
    assert!(db.prepare(&[table("items", &[])], true).await.unwrap().is_ready());

    let report = db.prepare(&[table("items", &["code"])], true).await.unwrap();
    let found = messages(&report);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with(
            "public.items: keys table switchyard.switchyard_keys_public_items already exists on NEW"
        ),
        "{}",
        found[0]
    );
    assert_eq!(
        columns(&db.new, "switchyard.switchyard_keys_public_items").await[0],
        "id integer NOT NULL",
        "the existing keys table is untouched"
    );
}

#[tokio::test]
async fn an_unreachable_store_is_an_error_naming_it() {
    let db = Pair::same("prep_down", SHOP).await.unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy(&format!("postgres://postgres:hunter2@127.0.0.1:{port}/x"))
        .unwrap();
    let err = prepare(&db.old_pool, &down, &[table("accounts", &[])], true)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Query { role: "new", .. }), "{text}");
    assert!(
        text.starts_with("new store: reading the catalog entry of public.accounts"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!has_side_schema(&db.old).await);
}
