//! Cheap statement classification for metrics and logs in passthrough.
//!
//! Passthrough forwards every statement as it came; it only needs a label. Looking at the first
//! keyword is enough for that and costs a few nanoseconds. Routing decisions (dual writes) use a
//! real SQL parser instead.

/// Which protocol carried a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Query message.
    Simple = 0,
    /// Parse/Bind/Execute.
    Extended = 1,
}

impl Protocol {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
        }
    }
}

/// What a statement does, judged by its first keyword.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementKind {
    /// SELECT, VALUES, SHOW, TABLE, WITH ... SELECT, FETCH.
    Read = 0,
    /// INSERT, UPDATE, DELETE, MERGE, COPY, TRUNCATE.
    Write = 1,
    /// CREATE, ALTER, DROP, COMMENT, GRANT, REVOKE.
    Ddl = 2,
    /// BEGIN, START, COMMIT, END, ROLLBACK, SAVEPOINT, RELEASE, PREPARE TRANSACTION.
    Transaction = 3,
    /// Everything else (SET, LISTEN, DISCARD, empty queries, ...).
    Other = 4,
}

impl StatementKind {
    /// Number of kinds.
    pub const COUNT: usize = 5;
    /// Every kind, in label order.
    pub const ALL: [StatementKind; 5] = [
        StatementKind::Read,
        StatementKind::Write,
        StatementKind::Ddl,
        StatementKind::Transaction,
        StatementKind::Other,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Read => "read",
            StatementKind::Write => "write",
            StatementKind::Ddl => "ddl",
            StatementKind::Transaction => "transaction",
            StatementKind::Other => "other",
        }
    }

    /// Classifies a statement by its first keyword, skipping white space, comments and
    /// parentheses. A WITH query counts as a write if it contains a data-modifying keyword.
    pub fn of(sql: &[u8]) -> StatementKind {
        let word = first_word(sql);
        let mut lower = [0u8; 12];
        let n = word.len().min(lower.len());
        for (dst, src) in lower.iter_mut().zip(&word[..n]) {
            *dst = src.to_ascii_lowercase();
        }
        match &lower[..n] {
            b"select" | b"values" | b"show" | b"table" | b"fetch" | b"explain" => StatementKind::Read,
            b"insert" | b"update" | b"delete" | b"merge" | b"copy" | b"truncate" => StatementKind::Write,
            b"with" => {
                if contains_write_keyword(sql) {
                    StatementKind::Write
                } else {
                    StatementKind::Read
                }
            }
            b"create" | b"alter" | b"drop" | b"comment" | b"grant" | b"revoke" | b"reindex" => {
                StatementKind::Ddl
            }
            b"begin" | b"start" | b"commit" | b"end" | b"rollback" | b"abort" | b"savepoint" | b"release"
            | b"prepare" => StatementKind::Transaction,
            _ => StatementKind::Other,
        }
    }
}

fn first_word(sql: &[u8]) -> &[u8] {
    let mut i = 0;
    loop {
        match sql.get(i..) {
            Some([b'-', b'-', ..]) => {
                i += sql[i..].iter().position(|&b| b == b'\n').unwrap_or(sql.len() - i);
            }
            Some([b'/', b'*', ..]) => {
                i += sql[i..]
                    .windows(2)
                    .position(|w| w == b"*/")
                    .map_or(sql.len() - i, |p| p + 2);
            }
            Some([c, ..]) if c.is_ascii_whitespace() || *c == b'(' => i += 1,
            _ => break,
        }
    }
    let rest = &sql[i.min(sql.len())..];
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    &rest[..end]
}

fn contains_write_keyword(sql: &[u8]) -> bool {
    sql.split(|b| !b.is_ascii_alphabetic()).any(|w| {
        w.eq_ignore_ascii_case(b"insert")
            || w.eq_ignore_ascii_case(b"update")
            || w.eq_ignore_ascii_case(b"delete")
            || w.eq_ignore_ascii_case(b"merge")
    })
}

#[cfg(test)]
mod tests {
    use super::StatementKind::{self, *};

    #[test]
    fn classifies_by_first_keyword() {
        let cases: [(&str, StatementKind); 11] = [
            ("select 1", Read),
            ("  -- hi\n /* c */ (SELECT 1)", Read),
            ("INSERT INTO t VALUES (1)", Write),
            ("with x as (delete from t returning *) select * from x", Write),
            ("WITH x AS (SELECT 1) SELECT * FROM x", Read),
            ("create table t (a int)", Ddl),
            ("BEGIN", Transaction),
            ("savepoint a", Transaction),
            ("set search_path = x", Other),
            ("", Other),
            ("/* unterminated", Other),
        ];
        for (sql, kind) in cases {
            assert_eq!(StatementKind::of(sql.as_bytes()), kind, "{sql}");
        }
    }
}
