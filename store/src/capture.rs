//! Change capture on OLD: the row triggers `switchyard prepare` installs on every mirrored table.
//!
//! Statement analysis in the proxy cannot see every row change a statement makes: foreign-key
//! cascades, rules, updatable views, functions calling functions, a partition written directly,
//! a temporary table or another schema shadowing a name, `U&"..."` identifiers. The server can.
//! So the capture is a trigger on the table itself (as trigger-based replicators such as
//! Londiste, Slony and Bucardo capture changes), identified by the table's OID, not by a spelling:
//!
//! - `switchyard_capture`, a **deferred constraint trigger** `AFTER INSERT OR UPDATE OR DELETE
//!   ... FOR EACH ROW`. Deferred, because PostgreSQL then fires it only for row changes that
//!   survive: events of a subtransaction that rolled back (`ROLLBACK TO SAVEPOINT`, an exception
//!   block in a function) are discarded with it.
//!   <https://www.postgresql.org/docs/current/sql-createtrigger.html>
//! - Before it commits, a proxy that mirrors the transaction runs [`CAPTURE_STATEMENT`]-prefixed
//!   `SET CONSTRAINTS ... IMMEDIATE`, which fires the pending events at once (retroactively, as
//!   the documentation of SET CONSTRAINTS says) while the transaction still holds its row locks.
//!   The trigger recognises that statement (`current_query()`) and sends each row image to the
//!   proxy as a NoticeResponse with SQLSTATE [`CAPTURE_SQLSTATE`]; the proxy takes those notices
//!   out of the client's stream and applies the images to NEW before OLD commits.
//!   <https://www.postgresql.org/docs/current/sql-set-constraints.html>
//! - Fired any other way (at COMMIT, because no proxy ran the statement: a direct connection, a
//!   statement the proxy did not recognise as a write, a `COMMIT` inside a procedure), the trigger
//!   is the **net**: it records the changed key (or, for a table without a key, the appended row)
//!   as an intent in `switchyard.switchyard_intents` on OLD, in the same transaction, which the
//!   proxies' repair loop copies to NEW. So every row change of a mirrored table either reaches
//!   NEW before the client hears COMMIT or is recorded durably with it.
//!
//! The trigger functions are `SECURITY DEFINER` (the client needs no privilege on the side tables,
//! and row-level security does not hide rows from the capture) and run with fixed settings
//! (`search_path`, and of `TimeZone`, `IntervalStyle`, `extra_float_digits` and `bytea_output`
//! those that the table's column types print by), so an image is the same text whatever the
//! client's session says.
//!
//! `switchyard_guard`, a `BEFORE TRUNCATE` statement trigger (and, on tables without a key,
//! `BEFORE UPDATE OR DELETE`: such rows have no identity to mirror), applies the table's
//! `on_uncaptured` policy however the statement reached OLD: refuse it (SQLSTATE 0A000), or
//! mark the table in `switchyard.switchyard_verify`.

use sha2::{Digest, Sha256};
use switchyard_config::{TableName, UncapturedPolicy};

use crate::mirror::escape_literal;
use crate::postgres::catalog::{quote_ident, quote_table, Column, SIDE_SCHEMA};

/// SQLSTATE of the notices that carry row images (class `SY`, ours; PostgreSQL's own classes
/// never use letters past `X`). <https://www.postgresql.org/docs/current/errcodes-appendix.html>
pub const CAPTURE_SQLSTATE: &[u8; 5] = b"SY001";

/// The comment that starts the proxy's `SET CONSTRAINTS` statement: the trigger sends images
/// only while the current query starts with it.
pub const CAPTURE_STATEMENT: &str = "/*switchyard:capture*/";

/// The name of the capture trigger (and of its constraint) on every mirrored table.
pub const CAPTURE_TRIGGER: &str = "switchyard_capture";

/// The name of the statement guard trigger.
pub const GUARD_TRIGGER: &str = "switchyard_guard";

/// The name of the write fence on a table of the store that lost write authority at a cutover
/// barrier ([`fence_sql`]).
pub const FENCE_TRIGGER: &str = "switchyard_fence";

/// The setting Switchyard's own connections carry (the mirror's link, its repairs, the
/// backfill, the drift checker): the only writers a fence lets through.
pub const WRITER_SETTING: &str = "switchyard.writer";

/// The statements that fence every table of `tables` (`on`) or lift their fences. A fenced
/// table refuses every INSERT, UPDATE, DELETE and TRUNCATE (statement-level, so before any row is
/// touched, and on FK cascades too) unless the session carries [`WRITER_SETTING`]: whatever still
/// writes the store that lost write authority (a proxy that missed the barrier, paused or cut
/// off from the control state; an application connected to it directly) fails instead of
/// writing the old authority behind the new one's back. The store itself is the fence, so no
/// clock or lease is involved. The trigger function is (re)created once, before the triggers.
pub fn fence_sql<'a>(tables: impl IntoIterator<Item = &'a TableName>, on: bool) -> Vec<String> {
    let trigger = quote_ident(FENCE_TRIGGER);
    let schema = quote_ident(SIDE_SCHEMA);
    let mut steps = Vec::new();
    if on {
        steps.push(format!(
            "CREATE OR REPLACE FUNCTION {schema}.{trigger}() RETURNS trigger LANGUAGE plpgsql AS $fence$ \
             BEGIN \
               IF current_setting({setting}, true) IS DISTINCT FROM 'switchyard' THEN \
                 RAISE EXCEPTION 'table %.% is not written on this database: \
                   Switchyard moved its write authority to the other store', \
                   TG_TABLE_SCHEMA, TG_TABLE_NAME \
                   USING ERRCODE = '25006', \
                   HINT = 'Write through the Switchyard proxy; `switchyard phase` moves the authority back.'; \
               END IF; \
               RETURN NULL; \
             END $fence$",
            setting = escape_literal(WRITER_SETTING),
        ));
    }
    for table in tables {
        let qualified = quote_table(table);
        steps.push(format!("DROP TRIGGER IF EXISTS {trigger} ON {qualified}"));
        if on {
            steps.push(format!(
                "CREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {qualified} \
                 FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{trigger}()"
            ));
        }
    }
    steps
}

/// `proxy` of the intents the net writes: the repair loop takes them at once (no proxy is
/// about to finish them).
pub const NET_PROXY: &str = "switchyard:net";

/// The sequence numbering the net's intents (negative ids: the proxies' own are positive).
const NET_SEQUENCE: &str = "switchyard_net_ids";

/// OLD's record of when each table's capture began ([`boundary_sql`]).
pub const BOUNDARY_TABLE: &str = "switchyard_capture_boundary";

/// What a row image says happened to its row (the notice's hint field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageOp {
    /// The row now looks like the image (`u`).
    Upsert,
    /// The row with the image's key is gone (`d`).
    Delete,
    /// A new row of a table without a key (`a`).
    Append,
}

impl ImageOp {
    /// The op named by a notice's hint field.
    pub fn from_hint(hint: &[u8]) -> Option<ImageOp> {
        match hint {
            b"u" => Some(ImageOp::Upsert),
            b"d" => Some(ImageOp::Delete),
            b"a" => Some(ImageOp::Append),
            _ => None,
        }
    }
}

/// The `SET CONSTRAINTS` statement a proxy runs before committing a transaction it mirrors:
/// fires the capture triggers of every table in `tables` (one schema-qualified constraint name
/// per schema; an unqualified name would only be looked up in the session's `search_path`).
pub fn capture_statement<'a>(tables: impl IntoIterator<Item = &'a TableName>) -> String {
    let mut schemas: Vec<&str> = tables.into_iter().map(|t| t.schema.as_str()).collect();
    schemas.sort_unstable();
    schemas.dedup();
    let names: Vec<String> = schemas
        .iter()
        .map(|s| format!("{}.{}", quote_ident(s), quote_ident(CAPTURE_TRIGGER)))
        .collect();
    format!(
        "{CAPTURE_STATEMENT} SET CONSTRAINTS {} IMMEDIATE",
        names.join(", ")
    )
}

/// The name of `table`'s trigger functions in [`SIDE_SCHEMA`]: `prefix` and a digest of the
/// table's name (stable, short, and distinct for any two tables).
fn function_name(prefix: &str, table: &TableName) -> String {
    let digest = Sha256::digest(table.to_string().as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}.{}",
        quote_ident(SIDE_SCHEMA),
        quote_ident(&format!("{prefix}_{hex}"))
    )
}

/// The settings every image is made with, whatever the session's: `search_path`, so no user
/// object can stand in for a built-in in a `SECURITY DEFINER` function, and `client_min_messages`,
/// so the notices reach the proxy. <https://www.postgresql.org/docs/current/sql-createfunction.html>
/// (`SET` clause; each costs a save and a restore per call, so only these two are always set).
const ALWAYS_SET: &str = "SET search_path = pg_catalog, pg_temp SET client_min_messages = 'notice'";

/// How a column's values print in an image depends on these settings, by type: the `SET`
/// clauses a table's capture function needs. JSON prints dates and timestamps in ISO whatever
/// `DateStyle` says; `timestamptz` follows `TimeZone` (the instant is kept, but keys compare as
/// text in intents), floats follow `extra_float_digits` (below 1 they lose digits), `interval`
/// follows `IntervalStyle`, `bytea` follows `bytea_output`. A type not listed here (a domain, an
/// enum, a composite, an extension's type) may contain any of them, so it gets all four.
/// <https://www.postgresql.org/docs/current/runtime-config-client.html>
fn settings_for(columns: &[Column]) -> String {
    const TIMEZONE: &str = "SET \"TimeZone\" = 'UTC'";
    const FLOATS: &str = "SET extra_float_digits = '3'";
    const INTERVALS: &str = "SET \"IntervalStyle\" = 'postgres'";
    const BYTEA: &str = "SET bytea_output = 'hex'";
    let mut needed: Vec<&str> = Vec::new();
    for c in columns {
        let wants: &[&str] = match c.type_oid {
            // bool, "char", name, int8, int2, int4, text, oid, json, xml, cidr, inet, macaddr,
            // bpchar, varchar, date, time, timestamp, timetz, bit, varbit, numeric, uuid, jsonb,
            // and their arrays.
            16 | 18 | 19 | 20 | 21 | 23 | 25 | 26 | 114 | 142 | 650 | 869 | 829 | 1042 | 1043 | 1082
            | 1083 | 1114 | 1266 | 1560 | 1562 | 1700 | 2950 | 3802 | 1000 | 1002 | 1003 | 1005 | 1007
            | 1009 | 1014 | 1015 | 1016 | 1028 | 199 | 143 | 651 | 1041 | 1040 | 1182 | 1183 | 1115
            | 1270 | 1561 | 1563 | 1231 | 2951 | 3807 => &[],
            700 | 701 | 1021 | 1022 => &[FLOATS],
            1184 | 1185 => &[TIMEZONE],
            1186 | 1187 => &[INTERVALS],
            17 | 1001 => &[BYTEA],
            _ => &[TIMEZONE, FLOATS, INTERVALS, BYTEA],
        };
        for w in wants {
            if !needed.contains(w) {
                needed.push(w);
            }
        }
    }
    needed.sort_unstable();
    let mut out = ALWAYS_SET.to_owned();
    for w in needed {
        out.push(' ');
        out.push_str(w);
    }
    out
}

/// `RAISE NOTICE` of one image: `row` is `OLD` or `NEW`. Images are sent as UTF-8 JSON when the
/// client encoding is UTF-8, else base64 of the UTF-8 bytes (hint `u64` and so on), so no byte
/// depends on a conversion the client's encoding could fail or alter.
fn notice(table: &str, op: &str, row: &str) -> String {
    format!(
        "IF utf8 THEN RAISE NOTICE USING ERRCODE = 'SY001', MESSAGE = row_to_json({row})::text, \
         DETAIL = {table}, HINT = '{op}'; \
         ELSE RAISE NOTICE USING ERRCODE = 'SY001', \
         MESSAGE = translate(encode(convert_to(row_to_json({row})::text, 'UTF8'), 'base64'), E'\\n', ''), \
         DETAIL = {table}, HINT = '{op}64'; END IF;"
    )
}

/// The net's intent for the row `row` (`OLD` or `NEW`): its key, or for a table without a key
/// the row itself.
fn net_intent(table: &str, key: &[String], row: &str) -> String {
    let changes = if key.is_empty() {
        format!("jsonb_build_array(jsonb_build_object('t', {table}, 'r', jsonb_build_array(row_to_json({row})::jsonb)))")
    } else {
        let pairs: Vec<String> = key
            .iter()
            .map(|k| format!("{}, {row}.{}", escape_literal(k), quote_ident(k)))
            .collect();
        format!(
            "jsonb_build_array(jsonb_build_object('t', {table}, 'k', jsonb_build_array(jsonb_build_object({}))))",
            pairs.join(", ")
        )
    };
    format!(
        "INSERT INTO {schema}.switchyard_intents (id, created_at, proxy, changes) \
         VALUES (-nextval('{schema}.{NET_SEQUENCE}'), clock_timestamp(), {net}, {changes});",
        schema = quote_ident(SIDE_SCHEMA),
        net = escape_literal(NET_PROXY),
    )
}

/// `CREATE OR REPLACE FUNCTION` of `table`'s capture trigger function (`key` empty = append-only).
fn capture_function(table: &TableName, key: &[String], columns: &[Column]) -> String {
    let name = escape_literal(&table.to_string());
    let marker = escape_literal(CAPTURE_STATEMENT);
    let announced = if key.is_empty() {
        // UPDATE and DELETE of a table without a key are stopped (or marked) by the guard.
        format!("IF TG_OP = 'INSERT' THEN {} END IF;", notice(&name, "a", "NEW"))
    } else {
        let key_changed: Vec<String> = key
            .iter()
            .map(|k| format!("OLD.{0} IS DISTINCT FROM NEW.{0}", quote_ident(k)))
            .collect();
        format!(
            "IF TG_OP = 'DELETE' THEN {del} \
             ELSE IF TG_OP = 'UPDATE' AND ({changed}) THEN {del} END IF; {up} END IF;",
            del = notice(&name, "d", "OLD"),
            up = notice(&name, "u", "NEW"),
            changed = key_changed.join(" OR "),
        )
    };
    let net = if key.is_empty() {
        format!(
            "IF TG_OP = 'INSERT' THEN {} END IF;",
            net_intent(&name, key, "NEW")
        )
    } else {
        format!(
            "IF TG_OP <> 'INSERT' THEN {} END IF; IF TG_OP <> 'DELETE' THEN {} END IF;",
            net_intent(&name, key, "OLD"),
            net_intent(&name, key, "NEW")
        )
    };
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
         {settings} AS $switchyard$ \
         DECLARE utf8 boolean := current_setting('client_encoding') = 'UTF8'; \
         BEGIN \
         IF starts_with(current_query(), {marker}) THEN {announced} ELSE {net} END IF; \
         RETURN NULL; \
         END $switchyard$",
        function = function_name("capture", table),
        settings = settings_for(columns),
    )
}

/// `CREATE OR REPLACE FUNCTION` of `table`'s statement guard.
fn guard_function(table: &TableName, policy: UncapturedPolicy) -> String {
    let name = escape_literal(&table.to_string());
    let action = match policy {
        UncapturedPolicy::Refuse => format!(
            "RAISE EXCEPTION USING ERRCODE = '0A000', \
             MESSAGE = TG_OP || ' on table ' || {name} || ' cannot be mirrored to the new database during the migration', \
             HINT = 'Run it directly on both databases with the capture trigger disabled, or set on_uncaptured = \"mark_for_verify\" for the table and verify it before cutover.';"
        ),
        UncapturedPolicy::MarkForVerify => format!(
            "INSERT INTO {schema}.switchyard_verify (table_name, reason) \
             VALUES ({name}, TG_OP || ' ran on OLD and was not mirrored') \
             ON CONFLICT (table_name) DO UPDATE SET reason = EXCLUDED.reason, marked_at = now();",
            schema = quote_ident(SIDE_SCHEMA)
        ),
    };
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
         SET search_path = pg_catalog, pg_temp AS $switchyard$ BEGIN {action} RETURN NULL; END $switchyard$",
        function = function_name("guard", table),
    )
}

/// A `DO` block creating trigger `trigger` on `table` with `definition` unless it exists (a
/// constraint trigger cannot be created `OR REPLACE`, and dropping it first would take an
/// ACCESS EXCLUSIVE lock on a table the application is using), then running `after` (only when
/// it created the trigger).
fn create_trigger_once(table: &TableName, trigger: &str, definition: &str, after: &str) -> String {
    format!(
        "DO $switchyard$ DECLARE s pg_catalog.pg_snapshot; BEGIN IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger \
         WHERE tgrelid = {rel}::regclass AND tgname = {name} AND tgparentid = 0) THEN {definition}; {after} END IF; END $switchyard$",
        rel = escape_literal(&quote_table(table)),
        name = escape_literal(trigger),
    )
}

/// `x` (an SQL expression of type `xid`, 32 bits) as the `xid8` among the 2^32 ids up to
/// `latest` (an `int8` expression): the epoch a 32-bit id belongs to, reconstructed from a
/// known recent full id.
pub fn widen_xid(x: &str, latest: &str) -> String {
    format!(
        "(({latest}) - ((({latest}) - ({x})::text::int8) % 4294967296 + 4294967296) % 4294967296)::text::pg_catalog.xid8"
    )
}

/// PL/pgSQL statements, run right after the capture trigger was created (in the same transaction,
/// which holds the table's `SHARE ROW EXCLUSIVE` lock until it commits), recording the table's
/// **capture boundary** in [`BOUNDARY_TABLE`]: which transactions' rows are older than the
/// capture (`pg_current_snapshot()`, taken after the lock was granted), the table's size in
/// blocks then, and its file node.
///
/// `CREATE TRIGGER` waits for every transaction that wrote the table (each holds `ROW
/// EXCLUSIVE` until it ends), and every writer that comes after waits for this transaction's
/// commit and then sees the trigger. So the snapshot shows exactly the rows no trigger saw: those
/// of transactions committed before it. A transaction in progress in it inserts into the table
/// only after the commit, captured. The snapshot's list of transactions in progress has only
/// top-level ids, and a row's `xmin` may be a subtransaction's id
/// (<https://www.postgresql.org/docs/current/functions-info.html#FUNCTIONS-PG-SNAPSHOT>): the
/// ids locked in `pg_locks` (every transaction and subtransaction holds a lock on its own id
/// until its top-level transaction ends), read after the snapshot, are added to the list, so
/// `pg_visible_in_snapshot` answers right for them too.
fn boundary_sql(table: &TableName) -> String {
    let rel = format!("{}::regclass", escape_literal(&quote_table(table)));
    let latest = "pg_catalog.pg_snapshot_xmax(s)::text::int8 - 1";
    format!(
        "s := pg_catalog.pg_current_snapshot(); \
         INSERT INTO {schema}.{BOUNDARY_TABLE} (table_name, snapshot, blocks, filenode) \
         SELECT {name}, (pg_catalog.pg_snapshot_xmin(s) || ':' || pg_catalog.pg_snapshot_xmax(s) || ':' || \
           coalesce((SELECT pg_catalog.string_agg(x::text, ',' ORDER BY x) FROM (\
             SELECT pg_catalog.pg_snapshot_xip(s) AS x \
             UNION SELECT {locked} FROM pg_catalog.pg_locks l \
               WHERE l.locktype = 'transactionid' AND l.granted AND l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid()) AS i \
             WHERE x >= pg_catalog.pg_snapshot_xmin(s) AND x < pg_catalog.pg_snapshot_xmax(s)), ''))::pg_catalog.pg_snapshot, \
           pg_catalog.pg_relation_size({rel}) / pg_catalog.current_setting('block_size')::int8, \
           pg_catalog.pg_relation_filenode({rel}) \
         ON CONFLICT (table_name) DO UPDATE SET snapshot = EXCLUDED.snapshot, blocks = EXCLUDED.blocks, \
           filenode = EXCLUDED.filenode, recorded_at = now();",
        schema = quote_ident(SIDE_SCHEMA),
        name = escape_literal(&table.to_string()),
        locked = widen_xid("l.transactionid", latest),
    )
}

/// The `CREATE TABLE` of [`BOUNDARY_TABLE`] on OLD: one row per table whose capture triggers
/// `switchyard prepare` installed (see [`boundary_sql`]); the backfill of a table without a key
/// copies the rows visible in `snapshot`, in blocks below `blocks`.
pub fn boundary_table_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {}.{BOUNDARY_TABLE} (table_name text PRIMARY KEY, \
         snapshot pg_snapshot NOT NULL, blocks bigint NOT NULL, filenode oid, \
         recorded_at timestamptz NOT NULL DEFAULT now())",
        quote_ident(SIDE_SCHEMA)
    )
}

/// The statements that install the capture on `table` on OLD (idempotent): the sequence of the
/// net's intent ids, the two functions, and the triggers if missing.
pub fn install_sql(
    table: &TableName,
    key: &[String],
    columns: &[Column],
    policy: UncapturedPolicy,
) -> Vec<String> {
    let qualified = quote_table(table);
    let guard_events = if key.is_empty() {
        "TRUNCATE OR UPDATE OR DELETE"
    } else {
        "TRUNCATE"
    };
    vec![
        format!(
            "CREATE SEQUENCE IF NOT EXISTS {}.{}",
            quote_ident(SIDE_SCHEMA),
            quote_ident(NET_SEQUENCE)
        ),
        capture_function(table, key, columns),
        guard_function(table, policy),
        create_trigger_once(
            table,
            CAPTURE_TRIGGER,
            &format!(
                "CREATE CONSTRAINT TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {qualified} \
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {function}()",
                trigger = quote_ident(CAPTURE_TRIGGER),
                function = function_name("capture", table),
            ),
            &boundary_sql(table),
        ),
        // The guard's events depend on the key, which may have changed since it was created.
        format!(
            "DROP TRIGGER IF EXISTS {} ON {qualified}",
            quote_ident(GUARD_TRIGGER)
        ),
        format!(
            "CREATE TRIGGER {trigger} BEFORE {guard_events} ON {qualified} \
             FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
            trigger = quote_ident(GUARD_TRIGGER),
            function = function_name("guard", table),
        ),
    ]
}

/// The statements that remove the capture from `table` on OLD (a table back in `passthrough`),
/// and its capture boundary with it.
pub fn uninstall_sql(table: &TableName) -> Vec<String> {
    let qualified = quote_table(table);
    vec![
        format!(
            "DELETE FROM {}.{BOUNDARY_TABLE} WHERE table_name = {}",
            quote_ident(SIDE_SCHEMA),
            escape_literal(&table.to_string())
        ),
        format!(
            "DROP TRIGGER IF EXISTS {} ON {qualified}",
            quote_ident(CAPTURE_TRIGGER)
        ),
        format!(
            "DROP TRIGGER IF EXISTS {} ON {qualified}",
            quote_ident(GUARD_TRIGGER)
        ),
    ]
}

/// SQL returning the mirrored tables (named as [`quote_table`] quotes them, among `$1`) that
/// lack the capture trigger on OLD, for the proxy's start-up check.
pub const MISSING_CAPTURE_SQL: &str = "SELECT t FROM unnest($1::text[]) AS t \
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g \
     WHERE g.tgrelid = to_regclass(t) AND g.tgname = 'switchyard_capture' AND g.tgparentid = 0)";

#[cfg(test)]
mod tests {
    use super::*;

    fn column(type_oid: u32) -> Column {
        Column {
            name: "c".into(),
            type_name: String::new(),
            type_oid,
            not_null: false,
            has_default: false,
            generated: false,
            identity: None,
        }
    }

    #[test]
    fn functions_set_only_what_their_columns_print_by() {
        let plain = settings_for(&[column(23), column(25), column(1114)]);
        assert_eq!(plain, ALWAYS_SET);
        let tz = settings_for(&[column(1184), column(701), column(701)]);
        assert!(
            tz.contains("TimeZone") && tz.contains("extra_float_digits"),
            "{tz}"
        );
        assert!(!tz.contains("bytea_output"), "{tz}");
        let user_type = settings_for(&[column(70_000)]);
        for s in ["TimeZone", "extra_float_digits", "IntervalStyle", "bytea_output"] {
            assert!(user_type.contains(s), "{user_type}");
        }
    }

    #[test]
    fn the_capture_statement_names_each_schema_once() {
        let tables = [
            TableName::new("public", "a"),
            TableName::new("shop", "b"),
            TableName::new("public", "c"),
        ];
        assert_eq!(
            capture_statement(&tables),
            "/*switchyard:capture*/ SET CONSTRAINTS \"public\".\"switchyard_capture\", \
             \"shop\".\"switchyard_capture\" IMMEDIATE"
        );
    }

    #[test]
    fn function_names_are_stable_and_distinct() {
        let a = function_name("capture", &TableName::new("a_b", "c"));
        assert_eq!(a, function_name("capture", &TableName::new("a_b", "c")));
        assert_ne!(a, function_name("capture", &TableName::new("a", "b_c")));
        assert!(a.starts_with("\"switchyard\".\"capture_"), "{a}");
    }

    #[test]
    fn keyed_tables_send_the_old_key_when_it_changes() {
        let f = capture_function(&TableName::new("public", "t"), &["id".to_owned()], &[]);
        assert!(f.contains("OLD.\"id\" IS DISTINCT FROM NEW.\"id\""), "{f}");
        assert!(f.contains("SECURITY DEFINER"));
        assert!(f.contains("'id', OLD.\"id\""), "{f}");
        let g = capture_function(&TableName::new("public", "log"), &[], &[]);
        assert!(!g.contains("'d'"), "{g}");
        assert!(g.contains("HINT = 'a'"), "{g}");
    }
}
