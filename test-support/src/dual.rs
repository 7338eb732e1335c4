//! Dual-write fixtures: an OLD and a NEW database with the same schema, prepared by
//! `switchyard prepare`, proxies in phase `dual_write`, and a full comparison of both stores.

use std::collections::BTreeMap;

use anyhow::Context;
use switchyard_config::{Config, Phase, TableName, TableSettings, UncapturedPolicy};
use switchyard_store::{Role, Roles};

use crate::{ProxyConfig, TestDb, TestProxy};

/// One migrated table of a [`DualEnv`].
#[derive(Debug, Clone)]
pub struct DualTable {
    /// `schema.table`.
    pub name: String,
    /// Config `key` (empty = primary key or append-only).
    pub key: Vec<String>,
    /// Config `on_uncaptured`.
    pub on_uncaptured: &'static str,
}

impl DualTable {
    /// A table identified by its primary key, uncapturable writes refused.
    pub fn new(name: &str) -> DualTable {
        DualTable {
            name: name.to_owned(),
            key: Vec::new(),
            on_uncaptured: "refuse",
        }
    }
}

/// OLD and NEW with the same tables, prepared for dual writes from the authoritative store
/// (OLD unless a test swaps the roles) to the follower.
pub struct DualEnv {
    pub old: TestDb,
    pub new: TestDb,
    pub tables: Vec<DualTable>,
    /// Which store the proxies' sessions write first and which one follows.
    pub roles: Roles,
}

impl DualEnv {
    /// Creates both databases, runs `schema` on each and prepares the tables.
    pub async fn new(label: &str, schema: &str, tables: Vec<DualTable>) -> anyhow::Result<DualEnv> {
        Self::new_in(Roles::OLD_AUTHORITATIVE, label, schema, tables).await
    }

    /// The smallest mirrored set-up: table `kv (id bigint PRIMARY KEY, v text NOT NULL)` on both
    /// stores, prepared for dual writes, empty.
    pub async fn kv(label: &str) -> anyhow::Result<DualEnv> {
        Self::new(
            label,
            "CREATE TABLE kv (id bigint PRIMARY KEY, v text NOT NULL)",
            vec![DualTable::new("kv")],
        )
        .await
    }

    /// Like [`DualEnv::new`] with the stores in `roles`: with
    /// [`Roles::NEW_AUTHORITATIVE`], NEW gets the capture triggers and intents, OLD the key
    /// records, and the proxies of [`DualEnv::proxy`] log in to NEW and mirror to OLD.
    pub async fn new_in(
        roles: Roles,
        label: &str,
        schema: &str,
        tables: Vec<DualTable>,
    ) -> anyhow::Result<DualEnv> {
        let (old, new) = TestDb::create_pair(label).await?;
        old.execute_batch(schema).await?;
        new.execute_batch(schema).await?;
        let env = DualEnv {
            old,
            new,
            tables,
            roles,
        };
        env.prepare().await?;
        Ok(env)
    }

    /// The database of `role`.
    pub fn db(&self, role: Role) -> &TestDb {
        match role {
            Role::Old => &self.old,
            Role::New => &self.new,
        }
    }

    /// The authoritative store's database (OLD unless the roles are swapped).
    pub fn authoritative(&self) -> &TestDb {
        self.db(self.roles.authoritative)
    }

    /// The follower's database (NEW unless the roles are swapped).
    pub fn follower(&self) -> &TestDb {
        self.db(self.roles.follower)
    }

    /// Like [`DualEnv::new`], with `old_rows` (SQL batches, each run on its own, so `VACUUM` may
    /// be one) run on OLD after the schema and before `prepare`: rows that existed before the
    /// capture began. Tables without a key need this:
    /// their backfill copies only rows committed before their capture triggers were installed.
    pub async fn new_seeded(
        label: &str,
        schema: &str,
        old_rows: &[&str],
        tables: Vec<DualTable>,
    ) -> anyhow::Result<DualEnv> {
        let (old, new) = TestDb::create_pair(label).await?;
        old.execute_batch(schema).await?;
        new.execute_batch(schema).await?;
        for batch in old_rows {
            old.execute_batch(batch).await?;
        }
        let env = DualEnv {
            old,
            new,
            tables,
            roles: Roles::OLD_AUTHORITATIVE,
        };
        env.prepare().await?;
        Ok(env)
    }

    /// Like [`DualEnv::new`], but NEW is created on the server at `new_admin_url` (for example a
    /// [`crate::TestCluster`]'s `url("postgres")`, so a test can stop, restart or kill NEW) while
    /// OLD stays on the shared server.
    pub async fn new_with_new_admin(
        label: &str,
        schema: &str,
        tables: Vec<DualTable>,
        new_admin_url: &str,
    ) -> anyhow::Result<DualEnv> {
        let old = TestDb::create(&format!("{label}_old")).await?;
        let new = TestDb::create_at(new_admin_url, &format!("{label}_new")).await?;
        old.execute_batch(schema).await?;
        new.execute_batch(schema).await?;
        let env = DualEnv {
            old,
            new,
            tables,
            roles: Roles::OLD_AUTHORITATIVE,
        };
        env.prepare().await?;
        Ok(env)
    }

    /// Wraps two databases a test filled itself (for example with `pgbench -i`, which makes the
    /// same rows on both) and prepares the tables.
    pub async fn from_dbs(old: TestDb, new: TestDb, tables: Vec<DualTable>) -> anyhow::Result<DualEnv> {
        let env = DualEnv {
            old,
            new,
            tables,
            roles: Roles::OLD_AUTHORITATIVE,
        };
        env.prepare().await?;
        Ok(env)
    }

    /// A proxy config as [`DualEnv::proxy_config_via`] with a `[mirror]` section, e.g.
    /// `&[("timeout_ms", 500), ("repair_interval_ms", 200), ("stale_intent_secs", 5)]`.
    pub fn proxy_config_with_mirror(&self, follower_url: &str, mirror: &[(&str, u64)]) -> ProxyConfig {
        let mut cfg = self.proxy_config_via(follower_url);
        let mut section = String::from("[mirror]\n");
        for (key, value) in mirror {
            section.push_str(&format!("{key} = {value}\n"));
        }
        cfg.extra_sections.push(section);
        cfg
    }

    /// Every mirrored table's row count on OLD and on NEW, for progress reports.
    pub async fn row_counts(&self) -> anyhow::Result<Vec<(String, i64, i64)>> {
        let (old, new) = (self.old.client().await?, self.new.client().await?);
        let mut out = Vec::new();
        for t in &self.tables {
            let sql = format!("SELECT count(*) FROM {}", t.name);
            let o: i64 = old.query_one(&sql, &[]).await?.get(0);
            let n: i64 = new.query_one(&sql, &[]).await?.get(0);
            out.push((t.name.clone(), o, n));
        }
        Ok(out)
    }

    fn settings(&self) -> anyhow::Result<Vec<TableSettings>> {
        self.tables
            .iter()
            .map(|t| {
                Ok(TableSettings {
                    name: t.name.parse::<TableName>().map_err(anyhow::Error::msg)?,
                    phase: Phase::DualWrite,
                    read_share: 0,
                    shadow_share: 0,
                    key: t.key.clone(),
                    on_uncaptured: if t.on_uncaptured == "mark_for_verify" {
                        UncapturedPolicy::MarkForVerify
                    } else {
                        UncapturedPolicy::Refuse
                    },
                    group: None,
                })
            })
            .collect()
    }

    /// Runs `switchyard prepare` (the library call) and fails on any mismatch.
    pub async fn prepare(&self) -> anyhow::Result<()> {
        let authoritative = sqlx::PgPool::connect(self.authoritative().url()).await?;
        let follower = sqlx::PgPool::connect(self.follower().url()).await?;
        let report =
            switchyard_store::prepare_in(self.roles, &authoritative, &follower, &self.settings()?, true)
                .await?;
        anyhow::ensure!(report.mismatches.is_empty(), "prepare: {:?}", report.mismatches);
        authoritative.close().await;
        follower.close().await;
        Ok(())
    }

    /// A proxy config with every table in `dual_write` and the follower (NEW unless the roles
    /// are swapped) reached at `follower_url` (a fault injector in front of it, for example).
    pub fn proxy_config_via(&self, follower_url: &str) -> ProxyConfig {
        let mut cfg = match self.roles.follower {
            Role::New => ProxyConfig::passthrough(self.old.url(), follower_url),
            Role::Old => ProxyConfig::passthrough(follower_url, self.new.url()),
        };
        for t in &self.tables {
            let mut section = format!(
                "[[tables]]\nname = \"{}\"\nphase = \"dual_write\"\non_uncaptured = \"{}\"\n",
                t.name, t.on_uncaptured
            );
            if !t.key.is_empty() {
                let cols: Vec<String> = t.key.iter().map(|k| format!("\"{k}\"")).collect();
                section.push_str(&format!("key = [{}]\n", cols.join(", ")));
            }
            cfg.extra_sections.push(section);
        }
        cfg
    }

    /// A config with every table in `read_shift` at `share` percent of the sessions, the
    /// follower reached at `follower_url`.
    pub fn read_shift_config(&self, follower_url: &str, share: u8) -> ProxyConfig {
        let mut cfg = self.proxy_config_via(follower_url);
        for s in &mut cfg.extra_sections {
            *s = s.replace(
                "phase = \"dual_write\"",
                &format!("phase = \"read_shift\"\nread_share = {share}"),
            );
        }
        cfg
    }

    /// A proxy config with every table in `dual_write`.
    pub fn proxy_config(&self) -> ProxyConfig {
        self.proxy_config_via(self.follower().url())
    }

    /// Starts a proxy in `dual_write`.
    pub async fn proxy(&self) -> anyhow::Result<TestProxy> {
        self.start_proxy(&self.proxy_config()).await
    }

    /// Starts a proxy with `config`, in this environment's roles.
    pub async fn start_proxy(&self, config: &ProxyConfig) -> anyhow::Result<TestProxy> {
        TestProxy::start_with_roles(config, self.roles).await
    }

    /// The follower's URL with its host and port replaced by `addr` (a [`crate::FaultProxy`]
    /// in front of the follower's server), same user and database.
    pub fn follower_url_via(&self, addr: std::net::SocketAddr) -> String {
        let url = self.follower().url();
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let user = rest.split_once('@').map_or("postgres", |(u, _)| u);
        format!("postgres://{user}@{addr}/{}", self.follower().name())
    }

    /// `127.0.0.1:port` of the follower's server.
    pub fn follower_server(&self) -> std::net::SocketAddr {
        crate::server_of(self.follower().url())
    }

    /// Every row of `table` in OLD and NEW, as `row_to_json` text, sorted.
    async fn rows(db: &TestDb, table: &str) -> anyhow::Result<Vec<String>> {
        let client = db.client().await?;
        let rows = client
            .query(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
            .await
            .with_context(|| format!("reading {table} on {}", db.name()))?;
        let mut out: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        out.sort();
        Ok(out)
    }

    /// Full comparison of one table: the rows only OLD has and the rows only NEW has (as
    /// multisets, so duplicates in tables without a key count).
    pub async fn diff(&self, table: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        let old = Self::rows(&self.old, table).await?;
        let new = Self::rows(&self.new, table).await?;
        let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
        for r in &old {
            *counts.entry(r).or_default() += 1;
        }
        for r in &new {
            *counts.entry(r).or_default() -= 1;
        }
        let only_old = counts
            .iter()
            .filter(|(_, &n)| n > 0)
            .flat_map(|(r, &n)| std::iter::repeat_n(r.to_string(), n as usize))
            .collect();
        let only_new = counts
            .iter()
            .filter(|(_, &n)| n < 0)
            .flat_map(|(r, &n)| std::iter::repeat_n(r.to_string(), (-n) as usize))
            .collect();
        Ok((only_old, only_new))
    }

    /// Fails with the differing rows unless every table is identical in OLD and NEW.
    pub async fn assert_converged(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for t in &self.tables {
            let (only_old, only_new) = self.diff(&t.name).await?;
            if !only_old.is_empty() || !only_new.is_empty() {
                let show = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join("\n    ");
                problems.push(format!(
                    "{}: {} rows only in OLD, {} only in NEW\n  OLD:\n    {}\n  NEW:\n    {}",
                    t.name,
                    only_old.len(),
                    only_new.len(),
                    show(&only_old),
                    show(&only_new)
                ));
            }
        }
        anyhow::ensure!(problems.is_empty(), "stores differ:\n{}", problems.join("\n"));
        Ok(())
    }

    /// Writes rows on OLD that count as existing before dual writes began: OLD's capture
    /// triggers do not fire for this batch (`session_replication_role = replica`, which turns
    /// ordinary triggers off), so nothing is recorded for the repair loop and the backfill is
    /// what copies them. Not for tables without a key: their backfill copies only the rows
    /// committed before `prepare` installed the triggers (use [`DualEnv::new_seeded`]).
    /// <https://www.postgresql.org/docs/current/runtime-config-client.html#GUC-SESSION-REPLICATION-ROLE>
    pub async fn seed_old(&self, sql: &str) -> anyhow::Result<()> {
        self.old
            .execute_batch(&format!(
                "BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT"
            ))
            .await
    }

    /// Waits (up to `limit`) until the repair loop has copied what the capture trigger's net
    /// recorded (no intent left on OLD), then asserts both stores are identical.
    pub async fn assert_converged_after_repairs(&self, limit: std::time::Duration) -> anyhow::Result<()> {
        self.wait_for_no_intents(limit).await?;
        self.assert_converged().await
    }

    /// Intents on the authoritative store (transactions not yet confirmed on the follower).
    pub async fn pending_intents(&self) -> anyhow::Result<i64> {
        let c = self.authoritative().client().await?;
        Ok(
            c.query_one("SELECT count(*) FROM switchyard.switchyard_intents", &[])
                .await?
                .get(0),
        )
    }

    /// Waits until no intent is left on OLD (cleanup and repairs done), up to `limit`.
    pub async fn wait_for_no_intents(&self, limit: std::time::Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let n = self.pending_intents().await?;
            if n == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{n} intents still pending after {limit:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The config a CLI run would use, for tests that start the binary.
    pub fn config(&self) -> anyhow::Result<Config> {
        Config::from_toml_str(&self.proxy_config().to_toml(), Default::default())
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}
