//! Which statements may write to migrated tables, and which transaction control they are.
//!
//! The row changes themselves are captured by OLD's triggers (`switchyard_store::capture`),
//! whatever statement makes them; this analysis only tells the session when to act: open a
//! transaction around an autocommit write and run the capture statement before a commit (a
//! write it misses is still captured, by the trigger's net, only later), intercept COMMIT, and
//! refuse what cannot be mirrored at all (TRUNCATE, DDL on a migrated table, UPDATE or DELETE of
//! a table without a key). Statements are parsed with `pg_query` (PostgreSQL's own grammar, from
//! libpg_query): a CTE that deletes, a quoted identifier, a comment that looks like a keyword.
//!
//! Analyses are cached per statement text: prepared statements and repeated queries are parsed
//! once per proxy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use pg_query::protobuf::{self, TransactionStmtKind};
use pg_query::{NodeEnum, NodeRef};
use switchyard_config::TableName;

use crate::reads::{read_shape, ReadShape};

/// Cached analyses at most; beyond this, statements are analysed every time (simple-protocol
/// clients that inline literals would otherwise fill memory with one-off texts).
const CACHE_LIMIT: usize = 10_000;
/// Longest statement the analysis cache keeps (as its key): statements the application
/// repeats are short; a large one is analysed again if it comes back.
const CACHE_KEY_MAX: usize = 64 * 1024;

/// The migrated tables the proxy mirrors (phase `dual_write` and later), by name.
#[derive(Debug, Default)]
pub(crate) struct MigratedTables {
    by_name: HashMap<(String, String), usize>,
    keyed: Vec<bool>,
    /// Lower-cased table names, for the cheap pre-filter.
    needles: Vec<Vec<u8>>,
}

/// User functions and procedures whose body writes a migrated table: a call of one is a write
/// (see [`Stmt::Write`]). Read from OLD at start and every `[mirror] function_refresh_secs`, and extended at
/// once when a `CREATE FUNCTION` through the proxy defines one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Writers {
    /// name -> (schema, table index).
    by_name: HashMap<String, Vec<(String, usize)>>,
    /// Lower-cased names, for the cheap pre-filter.
    needles: Vec<Vec<u8>>,
}

impl Writers {
    /// The writers among `functions` (schema, name, table written).
    pub(crate) fn new(functions: Vec<(String, String, usize)>) -> Writers {
        let mut w = Writers::default();
        for (schema, name, table) in functions {
            w.insert(schema, name, table);
        }
        w
    }

    fn insert(&mut self, schema: String, name: String, table: usize) {
        let needle = name.to_ascii_lowercase().into_bytes();
        if !self.needles.contains(&needle) {
            self.needles.push(needle);
        }
        let defs = self.by_name.entry(name).or_default();
        if !defs.contains(&(schema.clone(), table)) {
            defs.push((schema, table));
        }
    }

    fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl MigratedTables {
    /// Registers table number `index` (`key` empty = append-only).
    pub(crate) fn new(tables: &[(TableName, Vec<String>)]) -> MigratedTables {
        let mut m = MigratedTables::default();
        for (i, (name, key)) in tables.iter().enumerate() {
            m.by_name.insert((name.schema.clone(), name.table.clone()), i);
            m.keyed.push(!key.is_empty());
            let needle = name.table.to_ascii_lowercase().into_bytes();
            if !m.needles.contains(&needle) {
                m.needles.push(needle);
            }
        }
        m
    }

    pub(crate) fn lookup(&self, rel: &protobuf::RangeVar) -> Option<usize> {
        let schema = if rel.schemaname.is_empty() {
            "public"
        } else {
            rel.schemaname.as_str()
        };
        self.by_name
            .get(&(schema.to_owned(), rel.relname.clone()))
            .copied()
    }

    fn lookup_name(&self, names: &[String]) -> Option<usize> {
        let (schema, table) = match names {
            [t] => ("public", t.as_str()),
            [s, t] => (s.as_str(), t.as_str()),
            [_, s, t] => (s.as_str(), t.as_str()),
            _ => return None,
        };
        self.by_name.get(&(schema.to_owned(), table.to_owned())).copied()
    }

    /// Whether `sql` could possibly concern a migrated table or a transaction: it names one of
    /// the tables (case-insensitively, as a substring) or contains a transaction keyword.
    /// False positives only cost a parse.
    fn might_matter(&self, sql: &[u8], writers: &Writers) -> bool {
        // The needles and words are lowercase; the statement is compared without a lowercase
        // copy of it (a statement may be hundreds of MB).
        if mentions_any(sql, self.needles.iter().chain(&writers.needles)) {
            return true;
        }
        sql.split(|b| !b.is_ascii_alphabetic())
            .any(|w| TXN_WORDS.iter().any(|t| w.eq_ignore_ascii_case(t)))
    }
}

/// The parts of a qualified name (`schema.name`) as the parser lists them.
fn string_names(items: &[protobuf::Node]) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| match i.node.as_ref() {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

/// The migrated table a piece of code (a function body, a DO block) seems to write: it has a
/// data-changing keyword and names the table.
fn writes_table(tables: &MigratedTables, code: &str) -> Option<usize> {
    let lower = code.to_ascii_lowercase();
    if !WRITE_WORDS.iter().any(|w| contains_word(&lower, w)) {
        return None;
    }
    tables
        .by_name
        .iter()
        .find(|((_, t), _)| contains_word(&lower, &t.to_ascii_lowercase()))
        .map(|(_, &table)| table)
}

/// The qualified names of every function call in a serialized parse tree.
fn collect_calls(v: &serde_json::Value, out: &mut Vec<Vec<String>>) {
    match v {
        serde_json::Value::Object(map) => {
            // A call in an expression is a `FuncCall` node; CALL holds its call as `funccall`.
            let call = map.get("FuncCall").or_else(|| map.get("funccall"));
            if let Some(serde_json::Value::Array(parts)) = call.and_then(|f| f.get("funcname")) {
                let mut names = Vec::new();
                for p in parts {
                    if let Some(serde_json::Value::String(s)) = p.pointer("/node/String/sval") {
                        names.push(s.clone());
                    }
                }
                out.push(names);
            }
            for child in map.values() {
                collect_calls(child, out);
            }
        }
        serde_json::Value::Array(items) => {
            for child in items {
                collect_calls(child, out);
            }
        }
        _ => {}
    }
}

/// Keywords of statements that change data, for recognising writer functions and DO blocks.
pub(crate) const WRITE_WORDS: &[&str] = &["insert", "update", "delete", "truncate", "merge", "copy"];

/// Whether any of `needles` (lower-case) occurs in `text`, ASCII case-insensitively, as a
/// substring: the cheap look before a parse. No lower-case copy of `text` is made (a statement
/// may be hundreds of MB).
pub(crate) fn mentions_any<N: AsRef<[u8]>>(text: &[u8], needles: impl IntoIterator<Item = N>) -> bool {
    needles.into_iter().any(|n| {
        let n = n.as_ref();
        text.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
    })
}

/// Whether `word` occurs in `text` (both lower-case) as a whole identifier.
pub(crate) fn contains_word(text: &str, word: &str) -> bool {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

const TXN_WORDS: &[&[u8]] = &[
    b"begin",
    b"start",
    b"commit",
    b"end",
    b"rollback",
    b"abort",
    b"savepoint",
    b"release",
    b"prepare",
    b"do",
];

/// Transaction control statements the session must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TxnOp {
    /// BEGIN or START TRANSACTION.
    Begin,
    /// COMMIT or END (with or without AND CHAIN).
    Commit,
    /// PREPARE TRANSACTION: two-phase commit by the client, which cannot be mirrored.
    Prepare,
    /// ROLLBACK, SAVEPOINT, RELEASE, ROLLBACK TO: the server's outcome is all that counts.
    Other,
}

/// What one statement is, for the dual-write session.
#[derive(Debug, Clone)]
pub(crate) enum Stmt {
    /// Touches no migrated table's data: forwarded unchanged.
    Plain,
    Txn(TxnOp),
    /// May change rows of a migrated table (index into the tables): an INSERT, UPDATE, DELETE,
    /// MERGE or COPY FROM on it, a data-modifying WITH query, a call of a writer function, a DO
    /// block naming it. The session wraps it in a transaction when it is autocommit and runs the
    /// capture statement before its commit.
    Write {
        table: usize,
    },
    /// Changes a migrated table in a way row images cannot carry.
    Uncaptured {
        table: usize,
        what: &'static str,
    },
    /// Names a table of another table group, whose writes the other store takes
    /// (`schema.table`): the statement must run there. A session moves there for a transaction
    /// that begins with it, and refuses it inside a transaction running here.
    Foreign {
        table: Arc<str>,
        /// It also names a table this store takes the writes of: it runs on neither.
        mixed: bool,
    },
}

impl Stmt {
    /// Whether the session must look at this statement (anything but `Plain`).
    pub(crate) fn matters(&self) -> bool {
        !matches!(self, Stmt::Plain)
    }
}

/// One statement of a query string: what it is.
#[derive(Debug, Clone)]
pub(crate) struct Analyzed {
    pub(crate) stmt: Stmt,
    /// A read whose results may be compared on both stores (`reads.rs`).
    pub(crate) read: Option<Arc<ReadShape>>,
}

/// A whole query string, statement by statement. `None` statements means the text could not be
/// parsed: it is forwarded as is and the server reports the syntax error.
#[derive(Debug)]
pub(crate) struct Analysis {
    pub(crate) stmts: Vec<Analyzed>,
}

impl Analysis {
    /// Whether any statement needs the session's attention.
    pub(crate) fn matters(&self) -> bool {
        self.stmts.iter().any(|s| s.stmt.matters())
    }
}

/// Parses and classifies statements, with a cache per statement text.
pub(crate) struct Analyzer {
    tables: MigratedTables,
    /// The configured tables whose writes the other store takes (table groups split between
    /// the stores): `(schema, table)` to `schema.table`.
    foreign: HashMap<(String, String), Arc<str>>,
    /// Their lower-cased names, for the pre-filter.
    foreign_needles: Vec<Vec<u8>>,
    /// Held shared while a statement is analysed and its analysis cached, exclusively while the
    /// set changes and the cache is emptied: no analysis made with an older set stays cached.
    writers: RwLock<Arc<Writers>>,
    /// How many times a `CREATE FUNCTION` through the proxy added writers: a refresh whose read
    /// of OLD began before such an addition keeps what was added (see [`Self::writers_mark`]).
    added: AtomicU64,
    cache: DashMap<String, Arc<Analysis>>,
}

impl Analyzer {
    pub(crate) fn new(tables: MigratedTables, writers: Writers) -> Analyzer {
        Analyzer {
            tables,
            foreign: HashMap::new(),
            foreign_needles: Vec::new(),
            writers: RwLock::new(Arc::new(writers)),
            added: AtomicU64::new(0),
            cache: DashMap::new(),
        }
    }

    /// The configured tables whose writes the other store takes: statements naming one are
    /// [`Stmt::Foreign`].
    pub(crate) fn with_foreign(mut self, foreign: &[TableName]) -> Analyzer {
        for name in foreign {
            self.foreign.insert(
                (name.schema.clone(), name.table.clone()),
                Arc::from(name.to_string()),
            );
            let needle = name.table.to_ascii_lowercase().into_bytes();
            if !self.foreign_needles.contains(&needle) {
                self.foreign_needles.push(needle);
            }
        }
        self
    }

    /// Whether some configured table's writes are the other store's.
    pub(crate) fn has_foreign(&self) -> bool {
        !self.foreign.is_empty()
    }

    /// The first table of another group `node` names, if any, and whether it also names one
    /// of this store's.
    fn foreign_in(&self, node: &NodeEnum) -> Option<(Arc<str>, bool)> {
        if self.foreign.is_empty() {
            return None;
        }
        let mut found = None;
        let mut mixed = false;
        for (inner, _, _, _) in node.nodes() {
            if let NodeRef::RangeVar(r) = inner {
                let schema = if r.schemaname.is_empty() {
                    "public"
                } else {
                    r.schemaname.as_str()
                };
                match self.foreign.get(&(schema.to_owned(), r.relname.clone())) {
                    Some(name) => {
                        found.get_or_insert_with(|| Arc::clone(name));
                    }
                    None => mixed |= self.tables.lookup(r).is_some(),
                }
            }
        }
        found.map(|table| (table, mixed))
    }

    /// Taken before a refresh reads OLD's functions, and given back to [`Self::set_writers`].
    pub(crate) fn writers_mark(&self) -> u64 {
        self.added.load(Ordering::Acquire)
    }

    /// Replaces the writer functions with a refresh from OLD that began at `mark`; returns the
    /// names that are new. A function defined through the proxy since `mark` may have committed
    /// after the refresh read OLD: then the current writers are kept as well (a dropped one
    /// goes with the next refresh).
    pub(crate) fn set_writers(&self, mut writers: Writers, mark: u64) -> Vec<String> {
        let Ok(mut current) = self.writers.write() else {
            return Vec::new();
        };
        if self.added.load(Ordering::Acquire) != mark {
            for (name, defs) in &current.by_name {
                for (schema, table) in defs {
                    writers.insert(schema.clone(), name.clone(), *table);
                }
            }
        }
        if **current == writers {
            return Vec::new();
        }
        let added = writers
            .by_name
            .iter()
            .filter(|(name, defs)| current.by_name.get(*name) != Some(defs))
            .map(|(name, _)| name.clone())
            .collect();
        *current = Arc::new(writers);
        self.cache.clear();
        added
    }

    fn add_writers(&self, found: Vec<(String, String, usize)>) {
        if let Ok(mut current) = self.writers.write() {
            let mut next = (**current).clone();
            for (schema, name, table) in found {
                next.insert(schema, name, table);
            }
            *current = Arc::new(next);
            self.added.fetch_add(1, Ordering::AcqRel);
            self.cache.clear();
        }
    }

    /// Analyses a query string (one or more statements).
    pub(crate) fn analyze(&self, sql: &str) -> Arc<Analysis> {
        if let Some(hit) = self.cache.get(sql) {
            return hit.clone();
        }
        let mut defined = Vec::new();
        let analysis = {
            let guard = self.writers.read();
            let writers = match &guard {
                Ok(w) => Arc::clone(w),
                Err(_) => Arc::default(),
            };
            let analysis = Arc::new(self.analyze_uncached(sql, &writers, &mut defined));
            // A large statement is not kept: the cache would hold a copy of it for good.
            if defined.is_empty() && sql.len() <= CACHE_KEY_MAX && self.cache.len() < CACHE_LIMIT {
                self.cache.insert(sql.to_owned(), analysis.clone());
            }
            analysis
        };
        if !defined.is_empty() {
            // A CREATE FUNCTION whose body writes a migrated table: its calls must be refused
            // (or marked) from now on, not after the next refresh.
            for (schema, name, table) in &defined {
                tracing::warn!(
                    function = %format!("{schema}.{name}"),
                    table,
                    "a function defined through the proxy writes a migrated table: its calls follow the table's on_uncaptured policy"
                );
            }
            self.add_writers(defined);
        }
        analysis
    }

    fn analyze_uncached(
        &self,
        sql: &str,
        writers: &Writers,
        defined: &mut Vec<(String, String, usize)>,
    ) -> Analysis {
        let plain = || Analysis {
            stmts: vec![Analyzed {
                stmt: Stmt::Plain,
                read: None,
            }],
        };
        let foreign = mentions_any(sql.as_bytes(), &self.foreign_needles);
        if !foreign && !self.tables.might_matter(sql.as_bytes(), writers) {
            return plain();
        }
        let Ok(parsed) = pg_query::parse(sql, 0) else {
            return plain();
        };
        let mut stmts = Vec::with_capacity(parsed.protobuf.stmts.len());
        for raw in &parsed.protobuf.stmts {
            let start = usize::try_from(raw.stmt_location).unwrap_or(0).min(sql.len());
            let end = match usize::try_from(raw.stmt_len).unwrap_or(0) {
                0 => sql.len(),
                n => (start + n).min(sql.len()),
            };
            let text = sql.get(start..end).unwrap_or(sql);
            let mut read = None;
            let stmt = match raw.stmt.as_deref().and_then(|n| n.node.as_ref()) {
                Some(NodeEnum::CreateFunctionStmt(f)) => {
                    defined.extend(self.defines_writer(f, text));
                    Stmt::Plain
                }
                Some(node) if let Some((table, mixed)) = foreign.then(|| self.foreign_in(node)).flatten() => {
                    Stmt::Foreign { table, mixed }
                }
                Some(node) => {
                    let stmt = self.classify(node, text, writers);
                    if !stmt.matters() {
                        read = read_shape(&self.tables, node, text).map(Arc::new);
                    }
                    stmt
                }
                None => Stmt::Plain,
            };
            stmts.push(Analyzed { stmt, read });
        }
        if stmts.is_empty() {
            return plain();
        }
        Analysis { stmts }
    }

    /// A `CREATE FUNCTION` or `CREATE PROCEDURE` whose body writes a migrated table (the same
    /// test as for the functions read from OLD: a data-changing keyword and the table's name):
    /// (schema, name, table). Unqualified names are taken as `public`.
    fn defines_writer(
        &self,
        f: &protobuf::CreateFunctionStmt,
        text: &str,
    ) -> Option<(String, String, usize)> {
        let names = string_names(&f.funcname);
        let (schema, name) = match names.as_slice() {
            [name] => ("public".to_owned(), name.clone()),
            [.., schema, name] => (schema.clone(), name.clone()),
            [] => return None,
        };
        let table = writes_table(&self.tables, text)?;
        Some((schema, name, table))
    }

    fn classify(&self, node: &NodeEnum, text: &str, writers: &Writers) -> Stmt {
        let stmt = self.classify_statement(node);
        if matches!(stmt, Stmt::Plain) {
            if let Some(w) = self.writer_call(node, text, writers) {
                return w;
            }
        }
        stmt
    }

    /// A call of a function known to write a migrated table, or a DO block that does.
    fn writer_call(&self, node: &NodeEnum, text: &str, writers: &Writers) -> Option<Stmt> {
        if let NodeEnum::DoStmt(_) = node {
            return writes_table(&self.tables, text).map(|table| Stmt::Write { table });
        }
        if writers.is_empty() {
            return None;
        }
        // pg_query's node iterator does not reach every expression (VALUES lists, for one), so
        // walk the whole tree as data. Only statements that name a writer function get here
        // (the pre-filter), so this stays off the common path.
        let Ok(tree) = serde_json::to_value(node) else {
            return None;
        };
        let mut calls = Vec::new();
        collect_calls(&tree, &mut calls);
        for names in calls {
            let (schema, name) = match names.as_slice() {
                [name] => (None, name.as_str()),
                [.., schema, name] => (Some(schema.as_str()), name.as_str()),
                [] => continue,
            };
            if let Some(defs) = writers.by_name.get(name) {
                if let Some((_, table)) = defs.iter().find(|(s, _)| schema.is_none_or(|want| want == s)) {
                    return Some(Stmt::Write { table: *table });
                }
            }
        }
        None
    }

    fn classify_statement(&self, node: &NodeEnum) -> Stmt {
        let write = |rel: Option<&protobuf::RangeVar>| match rel.and_then(|r| self.tables.lookup(r)) {
            Some(table) => Stmt::Write { table },
            None => self.nested_write(node).unwrap_or(Stmt::Plain),
        };
        match node {
            NodeEnum::TransactionStmt(t) => txn_op(t).map_or(Stmt::Plain, Stmt::Txn),
            NodeEnum::InsertStmt(s) => write(s.relation.as_ref()),
            NodeEnum::UpdateStmt(s) => match s.relation.as_ref().and_then(|r| self.tables.lookup(r)) {
                Some(table) if !self.tables.keyed[table] => Stmt::Uncaptured {
                    table,
                    what: "UPDATE of a table without a key",
                },
                _ => write(s.relation.as_ref()),
            },
            NodeEnum::DeleteStmt(s) => match s.relation.as_ref().and_then(|r| self.tables.lookup(r)) {
                Some(table) if !self.tables.keyed[table] => Stmt::Uncaptured {
                    table,
                    what: "DELETE from a table without a key",
                },
                _ => write(s.relation.as_ref()),
            },
            NodeEnum::MergeStmt(s) => write(s.relation.as_ref()),
            NodeEnum::CopyStmt(s) if s.is_from => write(s.relation.as_ref()),
            NodeEnum::TruncateStmt(s) => s
                .relations
                .iter()
                .find_map(|n| match n.node.as_ref() {
                    Some(NodeEnum::RangeVar(r)) => self.tables.lookup(r),
                    _ => None,
                })
                .map_or(Stmt::Plain, |table| Stmt::Uncaptured {
                    table,
                    what: "TRUNCATE",
                }),
            NodeEnum::AlterTableStmt(s) => self.uncaptured_on(s.relation.as_ref(), "ALTER TABLE"),
            NodeEnum::RenameStmt(s) => self.uncaptured_on(s.relation.as_ref(), "ALTER TABLE ... RENAME"),
            NodeEnum::DropStmt(s) => s
                .objects
                .iter()
                .find_map(|o| match o.node.as_ref() {
                    Some(NodeEnum::List(l)) => self.tables.lookup_name(&string_names(&l.items)),
                    _ => None,
                })
                .filter(|_| s.remove_type == protobuf::ObjectType::ObjectTable as i32)
                .map_or(Stmt::Plain, |table| Stmt::Uncaptured {
                    table,
                    what: "DROP TABLE",
                }),
            // A SELECT (or anything else) can hide a data-modifying CTE.
            other => self.nested_write(other).unwrap_or(Stmt::Plain),
        }
    }

    /// `what` on `rel`: uncaptured when `rel` is a migrated table, else plain.
    fn uncaptured_on(&self, rel: Option<&protobuf::RangeVar>, what: &'static str) -> Stmt {
        rel.and_then(|r| self.tables.lookup(r))
            .map_or(Stmt::Plain, |table| Stmt::Uncaptured { table, what })
    }

    /// A data-modifying statement nested below `node` (in a WITH clause) that targets a
    /// migrated table.
    fn nested_write(&self, node: &NodeEnum) -> Option<Stmt> {
        // The first node is `node` itself.
        for (inner, _, _, _) in node.nodes().into_iter().skip(1) {
            let rel = match inner {
                NodeRef::InsertStmt(s) => s.relation.as_ref(),
                NodeRef::UpdateStmt(s) => s.relation.as_ref(),
                NodeRef::DeleteStmt(s) => s.relation.as_ref(),
                NodeRef::MergeStmt(s) => s.relation.as_ref(),
                _ => None,
            };
            if let Some(table) = rel.and_then(|r| self.tables.lookup(r)) {
                return Some(Stmt::Write { table });
            }
        }
        None
    }
}

fn txn_op(t: &protobuf::TransactionStmt) -> Option<TxnOp> {
    let kind = TransactionStmtKind::try_from(t.kind).ok()?;
    Some(match kind {
        TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart => TxnOp::Begin,
        TransactionStmtKind::TransStmtCommit => TxnOp::Commit,
        TransactionStmtKind::TransStmtPrepare => TxnOp::Prepare,
        _ => TxnOp::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analyzer() -> Analyzer {
        Analyzer::new(
            MigratedTables::new(&[
                (TableName::new("public", "accounts"), vec!["id".to_owned()]),
                (TableName::new("public", "history"), vec![]),
                (
                    TableName::new("shop", "Orders"),
                    vec!["a".to_owned(), "b".to_owned()],
                ),
            ]),
            Writers::default(),
        )
    }

    fn one(sql: &str) -> Stmt {
        let a = analyzer().analyze(sql);
        assert_eq!(a.stmts.len(), 1, "{sql}");
        a.stmts[0].stmt.clone()
    }

    fn written(sql: &str) -> usize {
        match one(sql) {
            Stmt::Write { table } => table,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn writes_to_migrated_tables_are_recognised() {
        for (sql, table) in [
            ("insert into accounts (id, n) values (1, 2)", 0),
            (
                "UPDATE public.accounts a SET n = n + 1 FROM x WHERE a.id = x.id RETURNING a.n -- trailing\n;",
                0,
            ),
            ("delete from accounts using y where accounts.id = y.id /* c */", 0),
            ("insert into history values (1) on conflict do nothing", 1),
            ("insert into shop.\"Orders\" values (1, 2)", 2),
            ("update accounts set id = 2 where id = 1", 0),
            ("insert into accounts values (1) on conflict (id) do update set id = 3", 0),
            ("with d as (delete from accounts returning *) select * from d", 0),
            ("merge into accounts a using x on a.id = x.id when matched then delete", 0),
            ("copy accounts from stdin", 0),
        ] {
            assert_eq!(written(sql), table, "{sql}");
        }
    }

    #[test]
    fn untouched_tables_and_reads_are_plain() {
        for sql in [
            "select * from accounts",
            "insert into other values (1)",
            "update shop.orders set a = 1",
            "insert into other select * from accounts",
            "select 1",
            "not even sql accounts",
        ] {
            assert!(matches!(one(sql), Stmt::Plain), "{sql}");
        }
    }

    #[test]
    fn uncapturable_writes_are_named() {
        for (sql, what) in [
            ("truncate accounts", "TRUNCATE"),
            ("alter table accounts add column x int", "ALTER TABLE"),
            ("drop table accounts", "DROP TABLE"),
            ("update history set x = 1", "UPDATE of a table without a key"),
            ("delete from history", "DELETE from a table without a key"),
        ] {
            match one(sql) {
                Stmt::Uncaptured { what: w, .. } => assert_eq!(w, what, "{sql}"),
                other => panic!("{sql}: {other:?}"),
            }
        }
    }

    #[test]
    fn calls_of_writer_functions_and_writing_do_blocks_are_writes() {
        let a = Analyzer::new(
            MigratedTables::new(&[(TableName::new("public", "accounts"), vec!["id".to_owned()])]),
            Writers::new(vec![("public".to_owned(), "bump".to_owned(), 0)]),
        );
        for sql in [
            "select bump(1)",
            "select public.bump(1)",
            "call bump(2)",
            "insert into accounts values (bump(1))",
            "do $$ begin update accounts set n = 1; end $$",
        ] {
            assert!(
                matches!(a.analyze(sql).stmts[0].stmt, Stmt::Write { .. }),
                "{sql}"
            );
        }
        for sql in [
            "select other.bump(1)",
            "select bumpy(1)",
            "do $$ begin perform 1; end $$",
        ] {
            assert!(matches!(a.analyze(sql).stmts[0].stmt, Stmt::Plain), "{sql}");
        }
        assert!(contains_word("update accounts set", "accounts"));
        assert!(!contains_word("update accounts_old set", "accounts"));
    }

    #[test]
    fn functions_defined_later_are_known_at_once_and_refreshes_replace_the_set() {
        let a = Analyzer::new(
            MigratedTables::new(&[(TableName::new("public", "accounts"), vec!["id".to_owned()])]),
            Writers::default(),
        );
        let call = "select credit(1)";
        // Cached as plain while no such writer is known.
        assert!(matches!(a.analyze(call).stmts[0].stmt, Stmt::Plain));
        // A harmless function changes nothing.
        a.analyze("create function credit(int) returns int language sql as $$ select 1 $$");
        assert!(matches!(a.analyze(call).stmts[0].stmt, Stmt::Plain));
        // Redefined to write a migrated table: its calls are uncaptured from the next statement.
        a.analyze(
            "create or replace function credit(x int) returns void language sql as \
             $$ update accounts set n = n + x where id = 1 $$",
        );
        assert!(
            matches!(a.analyze(call).stmts[0].stmt, Stmt::Write { table: 0 }),
            "the cached plain analysis was dropped"
        );
        assert!(matches!(
            a.analyze("call shop.restock()").stmts[0].stmt,
            Stmt::Plain
        ));
        a.analyze("CREATE PROCEDURE shop.restock() LANGUAGE plpgsql AS $$ BEGIN INSERT INTO accounts VALUES (1); END $$");
        assert!(matches!(
            a.analyze("call shop.restock()").stmts[0].stmt,
            Stmt::Write { .. }
        ));
        // Unqualified, it could resolve to shop.restock through the search_path: uncaptured too.
        assert!(matches!(
            a.analyze("call restock()").stmts[0].stmt,
            Stmt::Write { .. }
        ));
        assert!(matches!(
            a.analyze("call other.restock()").stmts[0].stmt,
            Stmt::Plain
        ));
        // A refresh from OLD that no longer lists them (dropped there) replaces the set.
        let mark = a.writers_mark();
        let added = a.set_writers(
            Writers::new(vec![("public".to_owned(), "bump".to_owned(), 0)]),
            mark,
        );
        assert_eq!(added, vec!["bump".to_owned()]);
        assert!(matches!(a.analyze(call).stmts[0].stmt, Stmt::Plain));
        assert!(matches!(
            a.analyze("select bump()").stmts[0].stmt,
            Stmt::Write { .. }
        ));
        let only_bump = || Writers::new(vec![("public".to_owned(), "bump".to_owned(), 0)]);
        assert!(a.set_writers(only_bump(), a.writers_mark()).is_empty());
        // A refresh that read OLD before a CREATE FUNCTION through the proxy committed does not
        // forget the new writer.
        let mark = a.writers_mark();
        a.analyze("create function credit(x int) returns void language sql as $$ delete from accounts $$");
        a.set_writers(only_bump(), mark);
        assert!(matches!(a.analyze(call).stmts[0].stmt, Stmt::Write { .. }));
        // The next refresh, begun after it, is taken as it is.
        a.set_writers(only_bump(), a.writers_mark());
        assert!(matches!(a.analyze(call).stmts[0].stmt, Stmt::Plain));
    }

    #[test]
    fn transaction_control_and_multi_statement_strings() {
        let a = analyzer().analyze("BEGIN; update accounts set n = 1 where id = 1; SAVEPOINT s1; ROLLBACK TO s1; RELEASE s1; COMMIT AND CHAIN; end");
        let kinds: Vec<String> = a.stmts.iter().map(|s| format!("{:?}", s.stmt)).collect();
        assert_eq!(a.stmts.len(), 7, "{kinds:?}");
        assert!(matches!(a.stmts[0].stmt, Stmt::Txn(TxnOp::Begin)));
        assert!(matches!(a.stmts[1].stmt, Stmt::Write { table: 0 }));
        for i in 2..5 {
            assert!(matches!(&a.stmts[i].stmt, Stmt::Txn(TxnOp::Other)), "{kinds:?}");
        }
        assert!(matches!(a.stmts[5].stmt, Stmt::Txn(TxnOp::Commit)));
        assert!(matches!(a.stmts[6].stmt, Stmt::Txn(TxnOp::Commit)));
    }
}
