//! Roles on the shared test server. Roles are cluster-wide, so each test names its own uniquely
//! and drops it when done.

use std::sync::atomic::AtomicU64;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A role on the shared server (`SWITCHYARD_TEST_PG`), dropped (after the databases that grant
/// it privileges, which must go first) when this value is.
#[derive(Debug)]
pub struct TestRole {
    /// Its name: `sy_<label>_<unique suffix>`, safe to write unquoted.
    pub name: String,
}

impl TestRole {
    /// Creates the role with `attributes` (`NOLOGIN`, `LOGIN PASSWORD '...'`, ...).
    pub async fn create(label: &str, attributes: &str) -> anyhow::Result<TestRole> {
        let name = format!("sy_{label}_{}", crate::unique_suffix(&COUNTER));
        let admin = crate::db::connect(&crate::pg_url()).await?;
        admin
            .batch_execute(&format!("CREATE ROLE {name} {attributes}"))
            .await?;
        Ok(TestRole { name })
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let sql = format!("DROP ROLE IF EXISTS {}", self.name);
        // Drop may run inside a runtime: a thread of its own with its own runtime works anywhere.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let admin = crate::db::connect(&crate::pg_url()).await?;
                admin.batch_execute(&sql).await?;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(done, Ok(Ok(()))) {
            eprintln!("test-support: could not drop role {}", self.name);
        }
    }
}
