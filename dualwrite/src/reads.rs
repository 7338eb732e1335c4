//! Which statements are reads whose results can be compared between the stores (shadow reads,
//! `docs/drift.md`, "Shadow reads"): a single `SELECT` that reads only migrated tables (and its
//! own CTEs), takes no row locks, creates nothing (`SELECT INTO`), calls no function whose
//! result depends on the moment or the session or that has side effects (`now()`, `random()`,
//! `nextval()`, `pg_*` functions such as `pg_sleep` or advisory locks, `CURRENT_TIMESTAMP` and
//! the other SQL value functions), and does not take an arbitrary subset of its rows (`LIMIT`
//! or `OFFSET` without `ORDER BY`). User functions are not looked into: a volatile one is
//! compared anyway (its differences are then re-run and counted like any other).

use pg_query::{NodeEnum, NodeRef};

use super::sql::MigratedTables;

/// An eligible read: the migrated tables it reads (by index, the first one names it in the
/// metrics) and whether its rows come in a defined order (a top-level `ORDER BY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadShape {
    pub(crate) tables: Vec<usize>,
    pub(crate) ordered: bool,
}

/// Functions whose results differ between two runs of the same statement, or that act on the
/// session or the server. Every `pg_*` function is excluded as well.
const UNSTABLE_FUNCTIONS: &[&str] = &[
    "now",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "random",
    "random_normal",
    "setseed",
    "nextval",
    "currval",
    "lastval",
    "setval",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "uuid_generate_v1",
    "uuid_generate_v4",
    "txid_current",
    "txid_current_if_assigned",
    "set_config",
    "inet_client_addr",
    "inet_client_port",
    "inet_server_addr",
    "inet_server_port",
    "lo_import",
    "lo_export",
    "dblink",
    "dblink_exec",
];

/// The shape of `node` if it is an eligible read, given the migrated tables.
pub(crate) fn read_shape(tables: &MigratedTables, node: &NodeEnum, text: &str) -> Option<ReadShape> {
    let NodeEnum::SelectStmt(top) = node else {
        return None;
    };
    let ordered = !top.sort_clause.is_empty();
    if !ordered && (top.limit_count.is_some() || top.limit_offset.is_some()) {
        return None;
    }
    let mut ctes: Vec<&str> = Vec::new();
    let mut read = Vec::new();
    let nodes = node.nodes();
    for (inner, _, _, _) in &nodes {
        if let NodeRef::CommonTableExpr(c) = inner {
            ctes.push(c.ctename.as_str());
        }
    }
    for (inner, _, _, _) in &nodes {
        match inner {
            NodeRef::SelectStmt(s) if s.into_clause.is_some() || !s.locking_clause.is_empty() => return None,
            NodeRef::RangeVar(r) => match tables.lookup(r) {
                Some(t) => {
                    if !read.contains(&t) {
                        read.push(t);
                    }
                }
                None if r.schemaname.is_empty() && ctes.contains(&r.relname.as_str()) => {}
                None => return None,
            },
            NodeRef::SqlvalueFunction(_) => return None,
            _ => {}
        }
    }
    if read.is_empty() || calls_unstable_function(node, text) {
        return None;
    }
    Some(ReadShape {
        tables: read,
        ordered,
    })
}

/// Whether the statement calls a function of [`UNSTABLE_FUNCTIONS`], a `pg_*` function or an
/// SQL value function. pg_query's node iterator does not reach every expression, so the whole
/// tree is walked as data, but only when the text could hold a call at all (a parenthesis, or a
/// word an SQL value function starts with): the common point lookup costs nothing more.
fn calls_unstable_function(node: &NodeEnum, text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    let value_words = ["current", "local", "user", "session"];
    if !lower.contains('(') && !value_words.iter().any(|w| lower.contains(w)) {
        return false;
    }
    let Ok(tree) = serde_json::to_value(node) else {
        return true;
    };
    unstable(&tree)
}

fn unstable(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(map) => {
            if map.contains_key("SqlvalueFunction") || map.contains_key("SQLValueFunction") {
                return true;
            }
            let call = map.get("FuncCall").or_else(|| map.get("funccall"));
            if let Some(serde_json::Value::Array(parts)) = call.and_then(|f| f.get("funcname")) {
                let name = parts
                    .last()
                    .and_then(|p| p.pointer("/node/String/sval"))
                    .and_then(|s| s.as_str())
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                if name.starts_with("pg_") || UNSTABLE_FUNCTIONS.contains(&name.as_str()) {
                    return true;
                }
            }
            map.values().any(unstable)
        }
        serde_json::Value::Array(items) => items.iter().any(unstable),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_config::TableName;

    fn shape(sql: &str) -> Option<ReadShape> {
        let tables = MigratedTables::new(&[
            (TableName::new("public", "accounts"), vec!["id".to_owned()]),
            (TableName::new("shop", "orders"), vec!["id".to_owned()]),
        ]);
        let parsed = pg_query::parse(sql, 0).unwrap();
        let node = parsed.protobuf.stmts[0]
            .stmt
            .as_ref()
            .unwrap()
            .node
            .as_ref()
            .unwrap();
        read_shape(&tables, node, sql)
    }

    #[test]
    fn plain_reads_of_migrated_tables_are_eligible() {
        for (sql, tables, ordered) in [
            ("select * from accounts where id = 1", vec![0], false),
            (
                "SELECT a.id, o.id FROM accounts a JOIN shop.orders o ON o.id = a.id ORDER BY 1",
                vec![0, 1],
                true,
            ),
            (
                "with x as (select id from accounts) select count(*) from x",
                vec![0],
                false,
            ),
            ("select id from accounts order by id limit 5", vec![0], true),
            (
                "select upper(owner), sum(balance) from accounts group by 1",
                vec![0],
                false,
            ),
            (
                "select * from accounts where id in (select id from shop.orders)",
                vec![0, 1],
                false,
            ),
        ] {
            assert_eq!(shape(sql), Some(ReadShape { tables, ordered }), "{sql}");
        }
    }

    #[test]
    fn other_statements_are_not() {
        for sql in [
            "select 1",
            "select * from other",
            "select * from accounts join other using (id)",
            "select * from accounts for update",
            "select * into copy from accounts",
            "select * from accounts limit 3",
            "select * from accounts offset 3",
            "select now(), * from accounts",
            "select * from accounts where created < current_timestamp",
            "select random() from accounts",
            "select pg_sleep(1) from accounts",
            "select pg_advisory_lock(id) from accounts",
            "select nextval('s') from accounts",
            "select current_user, id from accounts",
            "update accounts set id = 1",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
    }
}
