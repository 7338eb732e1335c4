//! PostgreSQL adapter (sqlx).

pub mod catalog;
mod tls;
pub mod wire;

use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use switchyard_config::{SslMode, StoreTls, StoreUrl};

use crate::{FunctionSource, PoolSettings, Role, StoreError};

/// sqlx connect options for the store at `url` (host, port, user, password, database), with
/// `application_name` so each program's sessions can be told apart in `pg_stat_activity`, and
/// `READ COMMITTED` as the default isolation level whatever the server's, database's or role's
/// default: fencing relies on it (a mirrored delete's snapshot is taken after the fence lock
/// statement before it, a repair's and a chunk's statements see what committed before their
/// locks were granted). Code that wants a snapshot for a whole transaction (the backfill's
/// reads of OLD) asks for `REPEATABLE READ` in its `BEGIN`.
/// <https://www.postgresql.org/docs/current/transaction-iso.html#XACT-READ-COMMITTED>
///
/// `row_security = off`: Switchyard's reads and writes must see every row. For a login that
/// bypasses row-level security (a superuser, `BYPASSRLS`) this changes nothing; for one a policy
/// applies to, a query the policy would filter fails instead of silently seeing fewer rows (a
/// repair that read a hidden row as gone would delete it on NEW; a backfill would skip it).
/// <https://www.postgresql.org/docs/current/runtime-config-client.html#GUC-ROW-SECURITY>
///
/// TLS as the URL's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` ask ([`tls_options`]).
pub fn connect_options(url: &StoreUrl, application_name: &str) -> PgConnectOptions {
    let options = PgConnectOptions::new()
        .host(&url.host)
        .port(url.port)
        .username(&url.user)
        .database(&url.database)
        .application_name(application_name)
        .options([
            ("default_transaction_isolation", "read committed"),
            ("row_security", "off"),
            // Switchyard's own writer: a table fenced on a store that lost write authority lets
            // it through (`capture::fence_sql`).
            (crate::capture::WRITER_SETTING, "switchyard"),
        ]);
    let options = tls_options(options, url);
    match &url.password {
        Some(password) => options.password(password),
        None => options,
    }
}

/// The URL's TLS settings on sqlx's options, with sqlx's rustls (ring) support. sqlx differs
/// from libpq (and from the wire-level logins, `tls.rs`) in three ways, documented in
/// the README (TLS toward the stores): `allow` becomes `prefer` (sqlx's `allow` never tries TLS, so a server
/// that requires TLS would refuse it); `prefer` does not retry in plain text when the server
/// refuses a login over TLS; `verify-ca` and `verify-full` also trust the public web roots
/// (webpki-roots) besides `sslrootcert`.
fn tls_options(options: PgConnectOptions, url: &StoreUrl) -> PgConnectOptions {
    let tls = match StoreTls::of(url) {
        Ok(tls) => tls,
        Err(why) => {
            // The config refuses such a URL at load; should one get here, fail closed: a
            // verifying mode with a root certificate file that cannot be read.
            tracing::error!(url = %url.redacted(), error = %why, "store URL's TLS settings");
            return options
                .ssl_mode(PgSslMode::VerifyFull)
                .ssl_root_cert("/nonexistent/switchyard-invalid-sslrootcert");
        }
    };
    let mode = match tls.mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require => PgSslMode::Require,
        SslMode::VerifyCa => PgSslMode::VerifyCa,
        SslMode::VerifyFull => PgSslMode::VerifyFull,
    };
    let mut options = options.ssl_mode(mode);
    if let Some(root) = &tls.root_cert {
        options = options.ssl_root_cert(root);
    }
    if let Some((cert, key)) = &tls.client_cert {
        options = options.ssl_client_cert(cert).ssl_client_key(key);
    }
    options
}

/// A PostgreSQL store: a small sqlx pool for the proxy's own queries.
#[derive(Debug, Clone)]
pub struct PgStore {
    role: Role,
    url: String,
    pool: PgPool,
}

impl PgStore {
    /// Builds the pool without connecting.
    pub fn connect_lazy(role: Role, url: &StoreUrl) -> PgStore {
        Self::connect_lazy_with(role, url, &PoolSettings::default())
    }

    /// Builds the pool as `settings` say, without connecting.
    pub fn connect_lazy_with(role: Role, url: &StoreUrl, settings: &PoolSettings) -> PgStore {
        let options = connect_options(url, settings.application_name).options(
            settings
                .server_settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(0)
            .acquire_timeout(settings.acquire_timeout)
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(options);
        PgStore {
            role,
            url: url.redacted().to_string(),
            pool,
        }
    }

    /// Whether a relation (`schema.name`) exists.
    pub async fn has_relation(&self, rel: &str) -> Result<bool, StoreError> {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(rel)
            .fetch_one(&self.pool)
            .await
            .map_err(self.failed("looking up a relation"))?;
        Ok(found.is_some())
    }

    /// Which of the relations `rels` (`schema.name`) do not exist, in one round trip.
    pub async fn missing_relations(&self, rels: &[String]) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT r FROM unnest($1::text[]) WITH ORDINALITY AS u(r, n) WHERE to_regclass(r) IS NULL ORDER BY n",
        )
        .bind(rels)
        .fetch_all(&self.pool)
        .await
        .map_err(self.failed("looking up relations"))
    }

    /// The stored secret of role `user` (as `pg_authid.rolpassword` holds it), by `auth_query`:
    /// a query taking the name as `$1` and returning the name and the secret, PgBouncer's
    /// convention. `None` when it returns no row or no secret. The secret is never logged.
    pub async fn role_secret(&self, auth_query: &str, user: &str) -> Result<Option<String>, StoreError> {
        use sqlx::Row as _;
        // The operator's own query from the config, not built from input: the user is a bind value.
        let row = sqlx::query(sqlx::AssertSqlSafe(auth_query.to_owned()))
            .bind(user)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.failed("running auth_query"))?;
        match row {
            None => Ok(None),
            Some(row) => row
                .try_get::<Option<String>, _>(1)
                .map_err(self.failed("reading auth_query's second column (the secret)")),
        }
    }

    /// Every user function and procedure with its definition and the triggers that run it.
    pub async fn function_sources(&self) -> Result<Vec<FunctionSource>, StoreError> {
        let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
            "SELECT n.nspname::text, p.proname::text, pg_get_functiondef(p.oid), \
                    (SELECT string_agg(format('%s on %s', t.tgname, t.tgrelid::regclass), ', ') \
                       FROM pg_trigger t WHERE t.tgfoid = p.oid AND NOT t.tgisinternal) \
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
              WHERE p.prokind IN ('f', 'p') \
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'switchyard') \
                AND n.nspname NOT LIKE 'pg_%'",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(self.failed("listing functions"))?;
        Ok(rows
            .into_iter()
            .map(|(schema, name, definition, triggers)| FunctionSource {
                schema,
                name,
                definition,
                triggers,
            })
            .collect())
    }

    /// Which of `tables` (quoted names) lack their capture trigger.
    pub async fn uncaptured_tables(&self, tables: &[String]) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(crate::capture::MISSING_CAPTURE_SQL)
            .bind(tables)
            .fetch_all(&self.pool)
            .await
            .map_err(self.failed("checking the capture triggers"))
    }

    fn failed(&self, action: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
        crate::mirror::failed(self.role.as_str(), action)
    }

    /// Which side this store is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The pool, for adapters built on top.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `SELECT 1` with a deadline.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, StoreError> {
        let started = Instant::now();
        match tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&self.pool)).await {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(source)) => Err(StoreError::Unavailable {
                role: self.role.as_str(),
                url: self.url.clone(),
                source,
            }),
            Err(_) => Err(StoreError::Timeout {
                role: self.role.as_str(),
                url: self.url.clone(),
                timeout,
            }),
        }
    }
}
