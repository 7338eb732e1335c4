//! Row-level security on a migrated table (issue 11, section 3): a session that writes through
//! the proxy as a role whose policies let it see and change only some rows (`SET ROLE` after the
//! proxy's login; `FORCE ROW LEVEL SECURITY`, so even the owner is bound) gets exactly what it
//! would get from OLD directly, every change it makes reaches NEW exactly, and the rows it cannot
//! see are touched on neither store.

use std::time::Duration;

use switchyard_test_support::{DualEnv, DualTable, TestProxy, TestRole};

const SETTLE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_bound_by_row_security_changes_only_its_rows_on_both_stores() {
    let role = TestRole::create("rls_tenant", "NOLOGIN").await.unwrap();
    let schema = format!(
        "CREATE TABLE docs (id int PRIMARY KEY, tenant text NOT NULL, body text);
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
         ALTER TABLE docs FORCE ROW LEVEL SECURITY;
         CREATE POLICY tenant_a ON docs USING (tenant = 'a') WITH CHECK (tenant = 'a');
         GRANT SELECT, INSERT, UPDATE, DELETE ON docs TO {r};",
        r = role.name
    );
    let env = DualEnv::new("rls", &schema, vec![DualTable::new("docs")])
        .await
        .unwrap();
    let p = TestProxy::start(&env.proxy_config_with_mirror(env.new.url(), &[("repair_interval_ms", 100)]))
        .await
        .unwrap();
    let c = p.client().await.unwrap();
    // The proxy's login (a superuser here) is not bound by the policies.
    c.batch_execute("INSERT INTO docs VALUES (1, 'a', 'a1'), (2, 'a', 'a2'), (3, 'b', 'b3'), (4, 'b', 'b4')")
        .await
        .unwrap();
    c.batch_execute(&format!("SET ROLE {}", role.name)).await.unwrap();
    let visible: i64 = c
        .query_one("SELECT count(*) FROM docs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(visible, 2, "the role sees tenant a's rows only");

    for sql in [
        "INSERT INTO docs VALUES (5, 'a', 'a5')",
        // Every row, as the role sees them: tenant a's only.
        "UPDATE docs SET body = body || ' touched'",
        "DELETE FROM docs WHERE id IN (2, 3)",
        "BEGIN",
        "UPDATE docs SET body = body || '!' WHERE id > 0",
        "INSERT INTO docs VALUES (6, 'a', 'a6')",
        "COMMIT",
    ] {
        c.batch_execute(sql).await.expect(sql);
    }
    // Hidden rows: an UPDATE and a DELETE that match nothing the role can see, in the extended
    // protocol, autocommit and in a transaction.
    let n = c
        .execute(
            "UPDATE docs SET body = $1 WHERE id = $2",
            &[&"hidden".to_owned(), &4i32],
        )
        .await
        .unwrap();
    assert_eq!(n, 0, "tenant b's row is hidden from the UPDATE");
    c.batch_execute("BEGIN").await.unwrap();
    let n = c
        .execute("DELETE FROM docs WHERE tenant = $1", &[&"b".to_owned()])
        .await
        .unwrap();
    assert_eq!(n, 0, "tenant b's rows are hidden from the DELETE");
    c.batch_execute("COMMIT").await.unwrap();
    // WITH CHECK refuses another tenant's row, as OLD directly would.
    let err = c
        .batch_execute("INSERT INTO docs VALUES (7, 'b', 'not allowed')")
        .await
        .expect_err("the policy refuses tenant b's row");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42501"), "{err}");
    let err = c
        .batch_execute("UPDATE docs SET tenant = 'b' WHERE id = 1")
        .await
        .expect_err("the policy refuses moving a row to tenant b");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("42501"), "{err}");
    c.batch_execute("RESET ROLE").await.unwrap();

    let rows = |db: &switchyard_test_support::TestDb| {
        let db = db.url().to_owned();
        async move {
            let (client, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client
                .query("SELECT id, tenant, body FROM docs ORDER BY id", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1), r.get::<_, String>(2)))
                .collect::<Vec<_>>()
        }
    };
    let expect = vec![
        (1, "a".to_owned(), "a1 touched!".to_owned()),
        (3, "b".to_owned(), "b3".to_owned()),
        (4, "b".to_owned(), "b4".to_owned()),
        (5, "a".to_owned(), "a5 touched!".to_owned()),
        (6, "a".to_owned(), "a6".to_owned()),
    ];
    assert_eq!(rows(&env.old).await, expect, "OLD");
    // The writes were mirrored before the client heard COMMIT.
    assert_eq!(rows(&env.new).await, expect, "NEW");
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
    drop(p);
    drop(env);
    drop(role);
}

/// Switchyard's own connections (repairs, backfill, prepare) turn row-level security off: with a
/// login a policy applies to, a filtered read fails rather than missing rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_connections_never_read_through_a_policy() {
    let db = switchyard_test_support::TestDb::create("rls_conn").await.unwrap();
    let url: switchyard_config::StoreUrl = db.url().parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(switchyard_store::connect_options(&url, "switchyard-test"))
        .await
        .unwrap();
    let setting: String = sqlx::query_scalar("SHOW row_security")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(setting, "off");
    pool.close().await;
}
