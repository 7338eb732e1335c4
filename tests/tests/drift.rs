//! The drift checker against real databases: known drift injected on NEW is estimated within
//! its interval and found exactly; equal data of many types compares equal whatever the
//! sessions that wrote it; results are recorded on NEW.

use std::collections::BTreeSet;

use switchyard_config::{Phase, StoreUrl, TableName, TableSettings, UncapturedPolicy};
use switchyard_drift::{DiffKind, DriftTable, RangesFrom, Recheck};
use switchyard_store::{Role, Store};
use switchyard_test_support::TestDb;

fn settings(name: &str) -> TableSettings {
    TableSettings {
        name: name.parse::<TableName>().unwrap(),
        phase: Phase::DualWrite,
        read_share: 0,
        shadow_share: 0,
        key: Vec::new(),
        on_uncaptured: UncapturedPolicy::Refuse,
        group: None,
    }
}

fn store(role: Role, db: &TestDb) -> Store {
    switchyard_drift::connect(role, &StoreUrl::parse(db.url()).unwrap()).unwrap()
}

/// A verify from scratch with `chunk_rows` keys per range.
async fn verify(
    old: &Store,
    new: &Store,
    table: &DriftTable,
    chunk_rows: u64,
    recheck: Recheck,
) -> Result<switchyard_drift::VerifyReport, switchyard_drift::DriftError> {
    let options = switchyard_drift::VerifyOptions {
        chunk_rows,
        recheck,
        resume: false,
        ..Default::default()
    };
    switchyard_drift::verify(old, new, table, &options, "test").await
}

const NO_RECHECK: Recheck = Recheck {
    rechecks: 0,
    pause: std::time::Duration::ZERO,
    racing_rechecks: 0,
};

/// OLD with 2,000 rows; NEW with the same rows except, chosen by a seeded generator, 30 changed
/// values, 20 missing rows and 20 extra ones. Returns the differing keys by kind.
async fn injected(label: &str) -> (TestDb, TestDb, BTreeSet<(i64, DiffKind)>) {
    let (old, new) = TestDb::create_pair(label).await.unwrap();
    let schema = "CREATE TABLE kv (id bigint PRIMARY KEY, v text NOT NULL, n numeric)";
    let rows = "INSERT INTO kv SELECT i, 'v' || i, i / 7.0 FROM generate_series(1, 2000) i";
    for db in [&old, &new] {
        db.execute_batch(schema).await.unwrap();
        db.execute_batch(rows).await.unwrap();
    }
    // A small linear congruential generator: the same keys on every run.
    let mut x: u64 = 42;
    let mut next = |m: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % m + 1
    };
    let mut chosen = BTreeSet::new();
    let mut truth = BTreeSet::new();
    while truth.len() < 50 {
        let id = next(2000) as i64;
        if !chosen.insert(id) {
            continue;
        }
        if truth.len() < 30 {
            new.execute_batch(&format!("UPDATE kv SET v = v || '!' WHERE id = {id}"))
                .await
                .unwrap();
            truth.insert((id, DiffKind::ValueDiffers));
        } else {
            new.execute_batch(&format!("DELETE FROM kv WHERE id = {id}"))
                .await
                .unwrap();
            truth.insert((id, DiffKind::MissingInNew));
        }
    }
    for id in 3001..=3020 {
        new.execute_batch(&format!("INSERT INTO kv VALUES ({id}, 'extra', NULL)"))
            .await
            .unwrap();
        truth.insert((id, DiffKind::ExtraInNew));
    }
    (old, new, truth)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_exactly_the_injected_keys_and_records_the_result() {
    let (old_db, new_db, truth) = injected("drift_verify").await;
    let (old, new) = (store(Role::Old, &old_db), store(Role::New, &new_db));
    let table = DriftTable::load(&old, &new, &settings("public.kv"))
        .await
        .unwrap();
    // Small ranges, so several are clean and several are read key by key.
    let r = verify(&old, &new, &table, 300, Recheck::default()).await.unwrap();
    let found: BTreeSet<(i64, DiffKind)> = r
        .differing_keys
        .iter()
        .map(|d| (d.key[0].parse().unwrap(), d.kind))
        .collect();
    assert_eq!(found, truth);
    assert_eq!((r.missing_in_new, r.extra_in_new, r.value_differs), (20, 20, 30));
    assert_eq!((r.rows_old, r.rows_new), (2000, 2000));
    assert!(r.chunks >= 7, "{} ranges", r.chunks);

    switchyard_drift::record(&new, switchyard_drift::Recorded::Verify(&r), table.phase, "test")
        .await
        .unwrap();
    let recorded = new_db
        .query_i64(
            "SELECT differing FROM switchyard.switchyard_drift WHERE table_name = 'public.kv' AND kind = 'verify' \
             AND phase = 'dual_write' ORDER BY recorded_at DESC LIMIT 1",
        )
        .await
        .unwrap();
    assert_eq!(recorded, 70);
}

/// Over 200 seeds, the 95% interval of a sample covers the true rate (70 of the 2,020 keys of
/// the union) in at least 90% of them, and the estimates average near it: drawing over the
/// union counts the extra rows too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_intervals_cover_the_true_rate() {
    let (old_db, new_db, truth) = injected("drift_sample").await;
    let (old, new) = (store(Role::Old, &old_db), store(Role::New, &new_db));
    let table = DriftTable::load(&old, &new, &settings("public.kv"))
        .await
        .unwrap();
    let true_rate = truth.len() as f64 / 2020.0;
    let (mut covered, mut sum, mut extra_seen) = (0, 0.0, 0);
    for seed in 0..200 {
        let r = switchyard_drift::sample(&old, &new, &table, 400, seed, NO_RECHECK)
            .await
            .unwrap();
        assert!(
            (300..=520).contains(&r.sampled),
            "seed {seed}: {} keys drawn",
            r.sampled
        );
        if r.ci95_low <= true_rate && true_rate <= r.ci95_high {
            covered += 1;
        }
        sum += r.rate;
        extra_seen += r.extra_in_new;
    }
    assert!(
        covered >= 180,
        "the interval covered the true rate in {covered} of 200 samples"
    );
    let mean = sum / 200.0;
    assert!(
        (mean - true_rate).abs() < 0.006,
        "mean estimate {mean}, true rate {true_rate}"
    );
    assert!(extra_seen > 0, "rows only NEW has are drawn too");
    // The same seed draws the same keys.
    let a = switchyard_drift::sample(&old, &new, &table, 400, 7, NO_RECHECK)
        .await
        .unwrap();
    let b = switchyard_drift::sample(&old, &new, &table, 400, 7, NO_RECHECK)
        .await
        .unwrap();
    assert_eq!((a.sampled, a.differing), (b.sampled, b.differing));
}

/// Rows written by sessions with other time zones, date styles and float settings on each
/// side, with keys and values of many types, compare equal; one changed value is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_values_of_many_types_compare_equal_and_one_change_is_found() {
    let (old_db, new_db) = TestDb::create_pair("drift_types").await.unwrap();
    let schema = "CREATE TABLE typed (u uuid, name text COLLATE \"C\", at timestamptz NOT NULL, \
                  n numeric, f float8, j jsonb, arr int[], b bytea, note text, iv interval, \
                  PRIMARY KEY (u, name, at))";
    let rows = "INSERT INTO typed SELECT md5(i::text)::uuid, 'name ' || i, \
                timestamptz '2026-01-01 00:00:00+00' + i * interval '1 hour', i / 3.0, i / 7.0::float8, \
                jsonb_build_object('i', i, 'a', array[i, i + 1]), array[i, -i], \
                decode(md5(i::text), 'hex'), CASE WHEN i % 3 = 0 THEN NULL ELSE 'note' END, \
                i * interval '1 minute' FROM generate_series(1, 300) i";
    old_db
        .execute_batch(&format!(
            "{schema}; SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY'; SET extra_float_digits = 0; {rows}"
        ))
        .await
        .unwrap();
    new_db
        .execute_batch(&format!(
            "{schema}; SET TimeZone = 'America/Los_Angeles'; SET IntervalStyle = 'iso_8601'; {rows}"
        ))
        .await
        .unwrap();
    let (old, new) = (store(Role::Old, &old_db), store(Role::New, &new_db));
    let table = DriftTable::load(&old, &new, &settings("public.typed"))
        .await
        .unwrap();
    assert_eq!(table.key, ["u", "name", "at"]);
    let r = verify(&old, &new, &table, 64, NO_RECHECK).await.unwrap();
    assert_eq!(r.differing, 0, "{:?}", r.differing_keys);
    let s = switchyard_drift::sample(&old, &new, &table, 1000, 1, NO_RECHECK)
        .await
        .unwrap();
    assert_eq!(
        (s.sampled, s.differing),
        (300, 0),
        "every key drawn, none differs"
    );

    new_db
        .execute_batch("UPDATE typed SET arr = array[0] WHERE name = 'name 150'")
        .await
        .unwrap();
    let r = verify(&old, &new, &table, 64, NO_RECHECK).await.unwrap();
    assert_eq!(r.differing, 1);
    assert_eq!(r.differing_keys[0].kind, DiffKind::ValueDiffers);
    assert_eq!(r.differing_keys[0].key[1], "name 150");
    let s = switchyard_drift::sample(&old, &new, &table, 1000, 1, NO_RECHECK)
        .await
        .unwrap();
    assert_eq!(s.differing, 1);
    assert_eq!(s.examples[0].key[1], "name 150");
}

/// NEW's table may list OLD's columns in another order and have more of its own: rows are
/// compared by OLD's columns, by name, so equal data compares equal, a change to a compared
/// column is found and a change to NEW's own column is not a difference. A key that may be NULL
/// and a column NEW lacks are refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_compare_by_olds_columns_by_name() {
    let (old_db, new_db) = TestDb::create_pair("drift_columns").await.unwrap();
    old_db
        .execute_batch(
            "CREATE TABLE kv (id int PRIMARY KEY, a text NOT NULL, b int, c timestamptz); \
             INSERT INTO kv SELECT i, 'a' || i, i * 2, timestamptz '2026-01-01' + i * interval '1 day' \
             FROM generate_series(1, 500) i; \
             CREATE TABLE loose (id int, v text); \
             CREATE TABLE narrow (id int PRIMARY KEY, v text, w text)",
        )
        .await
        .unwrap();
    new_db
        .execute_batch(
            "CREATE TABLE kv (c timestamptz, added text DEFAULT 'new only', b bigint, id int PRIMARY KEY, a text NOT NULL); \
             INSERT INTO kv (id, a, b, c) SELECT i, 'a' || i, i * 2, timestamptz '2026-01-01' + i * interval '1 day' \
             FROM generate_series(1, 500) i; \
             CREATE TABLE loose (id int, v text); \
             CREATE TABLE narrow (id int PRIMARY KEY, v text)",
        )
        .await
        .unwrap();
    let (old, new) = (store(Role::Old, &old_db), store(Role::New, &new_db));
    let table = DriftTable::load(&old, &new, &settings("public.kv"))
        .await
        .unwrap();
    let r = verify(&old, &new, &table, 64, NO_RECHECK).await.unwrap();
    assert_eq!(r.differing, 0, "{:?}", r.differing_keys);
    let s = switchyard_drift::sample(&old, &new, &table, 1000, 3, NO_RECHECK)
        .await
        .unwrap();
    assert_eq!((s.sampled, s.differing), (500, 0));

    new_db
        .execute_batch("UPDATE kv SET added = 'changed' WHERE id = 5; UPDATE kv SET b = 0 WHERE id = 77")
        .await
        .unwrap();
    let r = verify(&old, &new, &table, 64, NO_RECHECK).await.unwrap();
    let found: Vec<_> = r
        .differing_keys
        .iter()
        .map(|d| (d.key[0].as_str(), d.kind))
        .collect();
    assert_eq!(
        found,
        [("77", DiffKind::ValueDiffers)],
        "only the compared column counts"
    );

    let mut loose = settings("public.loose");
    loose.key = vec!["id".to_owned()];
    let refused = DriftTable::load(&old, &new, &loose)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("key column id may be NULL"), "{refused}");
    let refused = DriftTable::load(&old, &new, &settings("public.narrow"))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("column w is missing on NEW"), "{refused}");
}

/// Key ranges from the planner's histogram (after ANALYZE) and from reading every n-th key
/// find the same keys, including keys below OLD's smallest and above its largest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_from_statistics_or_keys_find_the_same_keys() {
    let (old_db, new_db) = TestDb::create_pair("drift_bounds").await.unwrap();
    let setup = "CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL); \
                 INSERT INTO kv SELECT i, 'v' || i FROM generate_series(1, 20000) i";
    old_db
        .execute_batch(&format!("{setup}; ANALYZE kv"))
        .await
        .unwrap();
    new_db
        .execute_batch(&format!(
            "{setup}; INSERT INTO kv VALUES (-5, 'below'), (0, 'below'), (30000, 'above'); \
             UPDATE kv SET v = 'changed' WHERE id = 12345; DELETE FROM kv WHERE id = 20000"
        ))
        .await
        .unwrap();
    let (old, new) = (store(Role::Old, &old_db), store(Role::New, &new_db));
    let table = DriftTable::load(&old, &new, &settings("public.kv"))
        .await
        .unwrap();
    let expected = [
        ("-5", DiffKind::ExtraInNew),
        ("0", DiffKind::ExtraInNew),
        ("12345", DiffKind::ValueDiffers),
        ("20000", DiffKind::MissingInNew),
        ("30000", DiffKind::ExtraInNew),
    ];
    // Histogram buckets of about 200 rows: ranges of 1,000 take every fifth bound; ranges of
    // 50 are finer than the histogram, so every 50th key is read.
    for (chunk, from) in [(1000, RangesFrom::Statistics), (50, RangesFrom::Keys)] {
        let r = verify(&old, &new, &table, chunk, NO_RECHECK).await.unwrap();
        assert_eq!(r.ranges_from, Some(from), "chunk {chunk}");
        let mut found: Vec<_> = r
            .differing_keys
            .iter()
            .map(|d| (d.key[0].as_str(), d.kind))
            .collect();
        found.sort_by_key(|(k, _)| k.parse::<i64>().unwrap());
        assert_eq!(found, expected, "chunk {chunk}");
        assert_eq!((r.rows_old, r.rows_new), (20_000, 20_002));
        let chunks = match from {
            RangesFrom::Keys => 401..=401,
            RangesFrom::Statistics => 15..=30,
        };
        assert!(chunks.contains(&r.chunks), "chunk {chunk}: {} ranges", r.chunks);
    }
}

/// Table `kv (id, v)` prepared for dual writes, with the same `rows` rows on both stores.
async fn prepared_kv(label: &str, rows: u32) -> switchyard_test_support::DualEnv {
    use switchyard_test_support::DualEnv;

    let env = DualEnv::kv(label).await.unwrap();
    let rows = format!("INSERT INTO kv SELECT i, 'v' || i FROM generate_series(1, {rows}) i");
    env.seed_old(&rows).await.unwrap();
    env.new.execute_batch(&rows).await.unwrap();
    env
}

/// The drift checker's stores on `env` and its table `public.kv`.
async fn stores_and_kv(env: &switchyard_test_support::DualEnv) -> (Store, Store, DriftTable) {
    let (old, new) = (store(Role::Old, &env.old), store(Role::New, &env.new));
    let table = DriftTable::load(&old, &new, &settings("public.kv"))
        .await
        .unwrap();
    (old, new, table)
}

/// A key still racing a write is read again for longer before it counts: one that an intent on
/// OLD names (its mirrored write failed and waits for the repair) and one whose key record on
/// NEW keeps moving are both healed 2.5 s later and not counted, while a plain difference is
/// counted after the usual re-reads (about 0.6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_racing_a_write_are_read_again_until_it_lands() {
    let env = prepared_kv("drift_racing", 100).await;
    env.old
        .execute_batch(
            "INSERT INTO switchyard.switchyard_intents (id, proxy, changes) \
             VALUES (1, 'a test', '[{\"t\": \"public.kv\", \"k\": [{\"id\": 42}]}]')",
        )
        .await
        .unwrap();
    env.new
        .execute_batch("UPDATE kv SET v = 'behind' WHERE id IN (42, 43, 44)")
        .await
        .unwrap();
    let records = switchyard_store::keys_table(&"public.kv".parse::<TableName>().unwrap());
    let started = std::time::Instant::now();
    let writer = {
        let new = env.new.client().await.unwrap();
        let records = records.clone();
        tokio::spawn(async move {
            let mut version = 1;
            while started.elapsed() < std::time::Duration::from_millis(2500) {
                new.batch_execute(&format!(
                    "INSERT INTO {records} (id, sy_version) VALUES (44, {version}) \
                     ON CONFLICT (id) DO UPDATE SET sy_version = excluded.sy_version"
                ))
                .await
                .unwrap();
                version += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            new.batch_execute("UPDATE kv SET v = 'v' || id WHERE id IN (42, 44)")
                .await
                .unwrap();
        })
    };
    let (old, new, table) = stores_and_kv(&env).await;
    let r = verify(&old, &new, &table, 30, Recheck::default()).await.unwrap();
    writer.await.unwrap();
    let found: Vec<&str> = r.differing_keys.iter().map(|d| d.key[0].as_str()).collect();
    assert_eq!(found, ["43"], "only the key no write was racing counts");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(2500),
        "the racing keys were read until their writes landed"
    );
}

/// `drift repair` re-copies exactly the confirmed differing keys by the mirror's repair path:
/// changed and missing rows come back from OLD, an extra row is deleted under a tombstone, and
/// a key that no longer differs by the time of the repair is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_fixes_the_confirmed_keys_only_and_verify_then_finds_nothing() {
    let env = prepared_kv("drift_repair", 500).await;
    env.new
        .execute_batch(
            "UPDATE kv SET v = 'changed' WHERE id IN (10, 20); DELETE FROM kv WHERE id = 30; \
             INSERT INTO kv VALUES (900, 'extra'); UPDATE kv SET v = 'healed later' WHERE id = 40",
        )
        .await
        .unwrap();
    let (old, new, table) = stores_and_kv(&env).await;
    // An uncaptured write marked the table for verification an hour ago.
    env.old
        .execute_batch(
            "INSERT INTO switchyard.switchyard_verify (table_name, reason, marked_at) \
             VALUES ('public.kv', 'a test', now() - interval '1 hour')",
        )
        .await
        .unwrap();
    let marks = "SELECT count(*) FROM switchyard.switchyard_verify";
    let found = verify(&old, &new, &table, 100, NO_RECHECK).await.unwrap();
    assert_eq!(found.differing, 5);
    assert!(!switchyard_drift::clear_verify_mark(&old, &found).await.unwrap());
    assert_eq!(
        env.old.query_i64(marks).await.unwrap(),
        1,
        "a verify that found drift clears nothing"
    );
    // Key 40 is fixed by someone else before the repair: it must not be touched.
    env.new
        .execute_batch("UPDATE kv SET v = 'v40' WHERE id = 40")
        .await
        .unwrap();

    let plain = |db: &TestDb, role| Store::connect_lazy(role, &StoreUrl::parse(db.url()).unwrap()).unwrap();
    let (authoritative, follower) = (plain(&env.old, Role::Old), plain(&env.new, Role::New));
    let r = switchyard_drift::repair(
        (&authoritative, &follower),
        (&old, &new),
        &table,
        &found.differing_keys,
        NO_RECHECK,
    )
    .await
    .unwrap();
    assert_eq!((r.candidates, r.confirmed, r.repaired, r.remaining), (5, 4, 4, 0));

    let after = verify(&old, &new, &table, 100, NO_RECHECK).await.unwrap();
    assert_eq!(after.differing, 0, "{:?}", after.differing_keys);
    assert!(switchyard_drift::clear_verify_mark(&old, &after).await.unwrap());
    assert_eq!(
        env.old.query_i64(marks).await.unwrap(),
        0,
        "a clean verify clears the mark"
    );
    // A mark made after the verify began (a write it may have missed) stays.
    env.old
        .execute_batch(
            "INSERT INTO switchyard.switchyard_verify (table_name, reason, marked_at) \
             VALUES ('public.kv', 'later', now() + interval '1 hour')",
        )
        .await
        .unwrap();
    assert!(!switchyard_drift::clear_verify_mark(&old, &after).await.unwrap());
    assert_eq!(env.old.query_i64(marks).await.unwrap(), 1);
    let keys_table = "switchyard.switchyard_keys_public_kv";
    assert_eq!(
        env.new
            .query_i64(&format!(
                "SELECT count(*) FROM {keys_table} WHERE id IN (10, 20, 30)"
            ))
            .await
            .unwrap(),
        3,
        "the repaired keys carry version records"
    );
    assert_eq!(
        env.new
            .query_i64(&format!(
                "SELECT count(*) FROM {keys_table} WHERE id = 900 AND sy_deleted"
            ))
            .await
            .unwrap(),
        1,
        "the extra row is deleted under a tombstone"
    );
    assert_eq!(
        env.new
            .query_i64(&format!("SELECT count(*) FROM {keys_table} WHERE id = 40"))
            .await
            .unwrap(),
        0,
        "a key that no longer differed was not touched"
    );
    assert_eq!(
        env.pending_intents().await.unwrap(),
        0,
        "the repair's intent is gone"
    );
}

/// No false differences: while clients write through two proxies in `dual_write` and a backfill
/// copies the rows OLD had before, then while the writes go on, sample and verify report only
/// the one key injected on NEW (the re-reads absorb the writes in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_false_differences_under_writes_through_two_proxies_and_a_backfill() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use switchyard_test_support::DualEnv;

    let env = DualEnv::kv("drift_busy").await.unwrap();
    env.seed_old("INSERT INTO kv SELECT i, 'old ' || i FROM generate_series(1, 3000) i")
        .await
        .unwrap();
    let proxies = [env.proxy().await.unwrap(), env.proxy().await.unwrap()];
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (i, proxy) in proxies.iter().enumerate() {
        for w in 0..2u64 {
            let client = proxy.client().await.unwrap();
            let stop = Arc::clone(&stop);
            writers.push(tokio::spawn(async move {
                // Seeded per writer: the same statements on every run, bounded in count.
                let mut x: u64 = 1 + i as u64 * 10 + w;
                for n in 0..20_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let id = (x >> 33) % 4000 + 1;
                    let sql = match (x >> 20) % 4 {
                        0 => format!("DELETE FROM kv WHERE id = {id}"),
                        1 => format!("INSERT INTO kv VALUES ({id}, 'new {n}') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v"),
                        _ => format!("UPDATE kv SET v = 'upd {n}' WHERE id = {id}"),
                    };
                    client.batch_execute(&sql).await.expect("a write through the proxy");
                }
            }));
        }
    }
    let config = env.config().unwrap();
    let (_trigger, halt) = switchyard_backfill::stop_channel();
    let options = switchyard_backfill::BackfillOptions {
        workers: 2,
        chunk_rows: 500,
        ..Default::default()
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        switchyard_backfill::run(&config, &options, halt),
    )
    .await
    .expect("backfill in time")
    .expect("backfill");
    // One real difference no client touches.
    env.new
        .execute_batch("INSERT INTO kv VALUES (999999, 'only on NEW')")
        .await
        .unwrap();

    let (old, new, table) = stores_and_kv(&env).await;
    for round in 0..2 {
        let r = verify(&old, &new, &table, 500, Recheck::default()).await.unwrap();
        let keys: Vec<_> = r
            .differing_keys
            .iter()
            .map(|d| (d.key[0].clone(), d.kind))
            .collect();
        assert_eq!(
            keys,
            [("999999".to_owned(), DiffKind::ExtraInNew)],
            "round {round}"
        );
        let s = switchyard_drift::sample(&old, &new, &table, 10_000, round, Recheck::default())
            .await
            .unwrap();
        assert_eq!(
            (s.differing, s.extra_in_new),
            (1, 1),
            "round {round}: {:?}",
            s.examples
        );
    }
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "the writes went on during the checks"
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    env.new
        .execute_batch("DELETE FROM kv WHERE id = 999999")
        .await
        .unwrap();
    env.assert_converged_after_repairs(Duration::from_secs(30))
        .await
        .unwrap();
}
