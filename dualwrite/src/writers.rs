//! User functions and procedures on the authoritative store that write a migrated table: their
//! calls cannot be captured by statement analysis, so they follow the table's `on_uncaptured`
//! policy. Read at start and again every `[mirror] function_refresh_secs`.

use switchyard_store::{FunctionSource, Store};

use crate::sql::{self, Writers};
use crate::Mirror;

/// A user function or procedure on OLD whose definition writes a migrated table.
pub(crate) struct WriterFunction {
    schema: String,
    name: String,
    table: usize,
    /// Triggers that run it, `name on table, ...`.
    triggers: Option<String>,
}

impl WriterFunction {
    pub(crate) fn log(&self, tables: &[(switchyard_config::TableName, Vec<String>)]) {
        let function = format!("{}.{}", self.schema, self.name);
        let table = &tables[self.table].0;
        tracing::warn!(
            function,
            table = %table,
            "this function writes a migrated table: its calls through the proxy follow the table's on_uncaptured policy"
        );
        if let Some(triggers) = &self.triggers {
            tracing::warn!(
                function,
                table = %table,
                triggers,
                "triggers run a function that writes a migrated table: those writes are not mirrored; verify the table before cutover"
            );
        }
    }
}

pub(crate) fn writer_set(functions: &[WriterFunction]) -> Writers {
    Writers::new(
        functions
            .iter()
            .map(|w| (w.schema.clone(), w.name.clone(), w.table))
            .collect(),
    )
}

/// User functions and procedures on OLD whose definition writes a migrated table (a data-changing
/// keyword and the table's name in the body): their calls cannot be captured, so they follow the
/// table's `on_uncaptured` policy. Triggers that run such functions are only reported: the proxy
/// cannot see the writes they make.
pub(crate) async fn writer_functions(
    old: &Store,
    tables: &[(switchyard_config::TableName, Vec<String>)],
) -> Result<Vec<WriterFunction>, switchyard_store::StoreError> {
    let rows = old.function_sources().await?;
    let mut writers = Vec::new();
    for FunctionSource {
        schema,
        name,
        definition,
        triggers,
    } in rows
    {
        let body = definition.to_ascii_lowercase();
        if !sql::WRITE_WORDS.iter().any(|w| sql::contains_word(&body, w)) {
            continue;
        }
        let Some(table) = tables
            .iter()
            .position(|(t, _)| sql::contains_word(&body, &t.table.to_ascii_lowercase()))
        else {
            continue;
        };
        writers.push(WriterFunction {
            schema,
            name,
            table,
            triggers,
        });
    }
    Ok(writers)
}

/// Re-reads OLD's writer functions every `[mirror] function_refresh_secs`: one created (or
/// changed) directly on OLD is known from the next refresh on. The mirrored tables' definitions
/// are read again at the same pace (`schema.rs`).
pub(crate) async fn writer_refresh_loop(mirror: std::sync::Weak<Mirror>) {
    loop {
        let interval = match mirror.upgrade() {
            Some(m) => m.settings.function_refresh,
            None => return,
        };
        tokio::time::sleep(interval).await;
        let Some(m) = mirror.upgrade() else { return };
        // A schema change neither an image nor NEW shows (a column type changed on OLD whose
        // values NEW still takes, a column added on NEW only) is found here.
        m.reread_all().await;
        let names: Vec<_> = m.tables.iter().map(|t| (t.name.clone(), t.key.clone())).collect();
        let mark = m.analyzer.writers_mark();
        match writer_functions(&m.authoritative, &names).await {
            Ok(found) => {
                let added = m.analyzer.set_writers(writer_set(&found), mark);
                for w in found.iter().filter(|w| added.contains(&w.name)) {
                    w.log(&names);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot re-read OLD's functions; trying again later"),
        }
    }
}
