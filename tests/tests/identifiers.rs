//! Names that PostgreSQL keeps only when quoted: a schema and a table with uppercase letters and
//! non-ASCII characters, and mixed-case columns, through the whole path (`prepare`, the proxy's
//! start checks, a mirrored write, the backfill).

use std::time::Duration;

use switchyard_backfill::progress::RunStatus;
use switchyard_backfill::BackfillOptions;
use switchyard_test_support::{DualEnv, DualTable};

/// As `[[tables]] name` says it: exactly as stored.
const TABLE: &str = "Märkte.UpperÑame";
/// As SQL says it.
const QUOTED: &str = "\"Märkte\".\"UpperÑame\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_whose_name_needs_quotes_is_prepared_mirrored_and_backfilled() -> anyhow::Result<()> {
    let schema = format!(
        "CREATE SCHEMA \"Märkte\"; \
         CREATE TABLE {QUOTED} (\"Id\" int PRIMARY KEY, \"Name\" text NOT NULL, note text)"
    );
    let env = DualEnv::new("ident_upper", &schema, vec![DualTable::new(TABLE)]).await?;
    // Rows from before dual writes: the backfill's to copy.
    env.seed_old(&format!(
        "INSERT INTO {QUOTED} SELECT g, 'before ' || g, NULL FROM generate_series(1, 50) g"
    ))
    .await?;

    // The proxy starts (its start checks find the side tables prepare created) and mirrors.
    let proxy = env.proxy().await?;
    let client = proxy.client().await?;
    client
        .batch_execute(&format!(
            "INSERT INTO {QUOTED} VALUES (100, 'mirrored', 'x'); \
             UPDATE {QUOTED} SET note = 'updated' WHERE \"Id\" = 7; \
             DELETE FROM {QUOTED} WHERE \"Id\" = 8"
        ))
        .await?;
    let on_new = env
        .new
        .query_i64(&format!("SELECT count(*) FROM {QUOTED} WHERE \"Id\" IN (7, 100)"))
        .await?;
    assert_eq!(on_new, 2, "the mirrored insert and update reached NEW");

    let config = env.config()?;
    let options = BackfillOptions {
        workers: 2,
        chunk_rows: 16,
        ..BackfillOptions::default()
    };
    let (_trigger, stop) = switchyard_backfill::stop_channel();
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        switchyard_backfill::run(&config, &options, stop),
    )
    .await??;
    assert_eq!(summary.status, RunStatus::Done);
    env.wait_for_no_intents(Duration::from_secs(30)).await?;
    let (only_old, only_new) = env.diff(QUOTED).await?;
    assert!(
        only_old.is_empty() && only_new.is_empty(),
        "only on OLD: {only_old:?}\nonly on NEW: {only_new:?}"
    );
    assert_eq!(
        env.new
            .query_i64(&format!("SELECT count(*) FROM {QUOTED}"))
            .await?,
        50
    );
    drop(client);
    proxy.stop().await?;
    Ok(())
}
