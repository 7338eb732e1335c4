//! The drift checker against real databases: known drift injected on NEW is estimated within
//! its interval and found exactly; equal data of many types compares equal whatever the
//! sessions that wrote it; results are recorded on NEW.

use std::collections::BTreeSet;

use switchyard_config::{Phase, StoreUrl, TableName, TableSettings, UncapturedPolicy};
use switchyard_drift::{DiffKind, DriftTable, Recheck};
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
    }
}

fn store(role: Role, db: &TestDb) -> Store {
    switchyard_drift::connect(role, &StoreUrl::parse(db.url()).unwrap()).unwrap()
}

const NO_RECHECK: Recheck = Recheck {
    rechecks: 0,
    pause: std::time::Duration::ZERO,
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
    let table = DriftTable::load(&old, &settings("public.kv")).await.unwrap();
    // Small ranges, so several are clean and several are read key by key.
    let r = switchyard_drift::verify(&old, &new, &table, 300, Recheck::default())
        .await
        .unwrap();
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
    let table = DriftTable::load(&old, &settings("public.kv")).await.unwrap();
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
    let table = DriftTable::load(&old, &settings("public.typed")).await.unwrap();
    assert_eq!(table.key, ["u", "name", "at"]);
    let r = switchyard_drift::verify(&old, &new, &table, 64, NO_RECHECK)
        .await
        .unwrap();
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
    let r = switchyard_drift::verify(&old, &new, &table, 64, NO_RECHECK)
        .await
        .unwrap();
    assert_eq!(r.differing, 1);
    assert_eq!(r.differing_keys[0].kind, DiffKind::ValueDiffers);
    assert_eq!(r.differing_keys[0].key[1], "name 150");
    let s = switchyard_drift::sample(&old, &new, &table, 1000, 1, NO_RECHECK)
        .await
        .unwrap();
    assert_eq!(s.differing, 1);
    assert_eq!(s.examples[0].key[1], "name 150");
}

/// `drift repair` re-copies exactly the confirmed differing keys by the mirror's repair path:
/// changed and missing rows come back from OLD, an extra row is deleted under a tombstone, and
/// a key that no longer differs by the time of the repair is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_fixes_the_confirmed_keys_only_and_verify_then_finds_nothing() {
    use switchyard_test_support::{DualEnv, DualTable};

    let env = DualEnv::new(
        "drift_repair",
        "CREATE TABLE kv (id bigint PRIMARY KEY, v text NOT NULL)",
        vec![DualTable::new("kv")],
    )
    .await
    .unwrap();
    let rows = "INSERT INTO kv SELECT i, 'v' || i FROM generate_series(1, 500) i";
    env.seed_old(rows).await.unwrap();
    env.new.execute_batch(rows).await.unwrap();
    env.new
        .execute_batch(
            "UPDATE kv SET v = 'changed' WHERE id IN (10, 20); DELETE FROM kv WHERE id = 30; \
             INSERT INTO kv VALUES (900, 'extra'); UPDATE kv SET v = 'healed later' WHERE id = 40",
        )
        .await
        .unwrap();
    let (old, new) = (store(Role::Old, &env.old), store(Role::New, &env.new));
    let table = DriftTable::load(&old, &settings("public.kv")).await.unwrap();
    // An uncaptured write marked the table for verification an hour ago.
    env.old
        .execute_batch(
            "INSERT INTO switchyard.switchyard_verify (table_name, reason, marked_at) \
             VALUES ('public.kv', 'a test', now() - interval '1 hour')",
        )
        .await
        .unwrap();
    let marks = "SELECT count(*) FROM switchyard.switchyard_verify";
    let found = switchyard_drift::verify(&old, &new, &table, 100, NO_RECHECK)
        .await
        .unwrap();
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

    let after = switchyard_drift::verify(&old, &new, &table, 100, NO_RECHECK)
        .await
        .unwrap();
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
    use switchyard_test_support::{DualEnv, DualTable};

    let env = DualEnv::new(
        "drift_busy",
        "CREATE TABLE kv (id bigint PRIMARY KEY, v text NOT NULL)",
        vec![DualTable::new("kv")],
    )
    .await
    .unwrap();
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

    let (old, new) = (store(Role::Old, &env.old), store(Role::New, &env.new));
    let table = DriftTable::load(&old, &settings("public.kv")).await.unwrap();
    for round in 0..2 {
        let r = switchyard_drift::verify(&old, &new, &table, 500, Recheck::default())
            .await
            .unwrap();
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
