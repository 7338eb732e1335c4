//! An in-process proxy on an ephemeral port, driven through the same `run` as the binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use switchyard_store::Roles;

use anyhow::Context;
use switchyard_config::Config;
use switchyard_proxy::{Listeners, ShutdownTrigger, StartError};
use tokio::task::JoinHandle;

/// Builds a config for tests: ports 0, the given stores, the given `[auth]` section.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// OLD store URL.
    pub old_url: String,
    /// NEW store URL.
    pub new_url: String,
    /// `trust`, `md5` or `scram-sha-256`.
    pub auth_method: String,
    /// Absolute path of a users file, when the method needs one.
    pub users_file: Option<String>,
    /// Extra lines for the `[auth]` section, e.g. `upstream_login = "service"`.
    pub auth_extra: Vec<String>,
    /// Extra lines for the `[proxy]` section, e.g. `max_connections = 2`.
    pub proxy_extra: Vec<String>,
    /// Whether to serve the admin API (on an ephemeral port).
    pub admin: bool,
    /// Whole sections appended as they are, e.g. `[telemetry]\notlp_endpoint = "..."`.
    pub extra_sections: Vec<String>,
}

impl ProxyConfig {
    /// Trust auth, admin API on, no extras.
    pub fn passthrough(old_url: &str, new_url: &str) -> Self {
        ProxyConfig {
            old_url: old_url.to_owned(),
            new_url: new_url.to_owned(),
            auth_method: "trust".to_owned(),
            users_file: None,
            auth_extra: Vec::new(),
            proxy_extra: Vec::new(),
            admin: true,
            extra_sections: Vec::new(),
        }
    }

    /// Adds a line to `[proxy]`.
    pub fn with_proxy_setting(mut self, line: &str) -> Self {
        self.proxy_extra.push(line.to_owned());
        self
    }

    /// Adds a line to `[auth]`.
    pub fn with_auth_setting(mut self, line: &str) -> Self {
        self.auth_extra.push(line.to_owned());
        self
    }

    /// Sessions log in to the store as its URL's user, whoever the client is
    /// (`[auth] upstream_login = "service"`).
    pub fn with_service_login(self) -> Self {
        self.with_auth_setting("upstream_login = \"service\"")
    }

    /// Uses `method` with a users file.
    pub fn with_auth(mut self, method: &str, users_file: &Path) -> Self {
        self.auth_method = method.to_owned();
        self.users_file = Some(users_file.display().to_string());
        self
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut toml = String::from("[proxy]\nlisten = \"127.0.0.1:0\"\n");
        toml.push_str(if self.admin {
            "admin_listen = \"127.0.0.1:0\"\n"
        } else {
            "admin_listen = \"off\"\n"
        });
        for line in &self.proxy_extra {
            toml.push_str(line);
            toml.push('\n');
        }
        toml.push_str(&format!(
            "[old]\nurl = \"{}\"\n[new]\nurl = \"{}\"\n[auth]\nmethod = \"{}\"\n",
            self.old_url, self.new_url, self.auth_method
        ));
        if let Some(users) = &self.users_file {
            toml.push_str(&format!("users_file = \"{users}\"\n"));
        }
        for line in &self.auth_extra {
            toml.push_str(line);
            toml.push('\n');
        }
        for section in &self.extra_sections {
            toml.push_str(section);
            toml.push('\n');
        }
        toml
    }
}

/// A running proxy. Dropping it stops the proxy immediately.
pub struct TestProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The admin API, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// The resolved config it runs with.
    pub config: Config,
    /// Which store sessions log in to and which one follows.
    pub roles: Roles,
    trigger: ShutdownTrigger,
    task: Option<JoinHandle<Result<(), StartError>>>,
}

impl TestProxy {
    /// Starts a proxy with this config (OLD authoritative).
    pub async fn start(config: &ProxyConfig) -> anyhow::Result<TestProxy> {
        Self::start_with_roles(config, Roles::OLD_AUTHORITATIVE).await
    }

    /// Starts a proxy with the stores in `roles` (`switchyard_proxy::run_with_roles`): clients
    /// reach `roles.authoritative`'s database.
    pub async fn start_with_roles(config: &ProxyConfig, roles: Roles) -> anyhow::Result<TestProxy> {
        crate::init_tracing();
        let config = Config::from_toml_str(&config.to_toml(), HashMap::new())
            .map_err(|e| anyhow::anyhow!("test config invalid: {e}"))?;
        let listeners = Listeners::bind(&config)?;
        let addr = listeners.client_addr().context("no client address")?;
        let admin_addr = listeners.admin_addr();
        let (trigger, shutdown) = switchyard_proxy::shutdown::channel();
        // OLD authoritative is how every proxy starts: the control state then decides, and the
        // proxy follows a cutover. Other roles are fixed (the engine's tests with NEW
        // authoritative from the start).
        let shared = std::sync::Arc::new(config.clone());
        let task = if roles == Roles::OLD_AUTHORITATIVE {
            tokio::spawn(switchyard_proxy::run(shared, listeners, shutdown))
        } else {
            tokio::spawn(switchyard_proxy::run_with_roles(
                shared, roles, listeners, shutdown,
            ))
        };
        Ok(TestProxy {
            addr,
            admin_addr,
            config,
            roles,
            trigger,
            task: Some(task),
        })
    }

    /// A passthrough proxy with trust auth in front of `old`.
    pub async fn passthrough(old_url: &str, new_url: &str) -> anyhow::Result<TestProxy> {
        Self::start(&ProxyConfig::passthrough(old_url, new_url)).await
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A libpq-style URL for `user` on the proxy's database.
    pub fn url(&self, user: &str) -> String {
        format!(
            "postgres://{user}@127.0.0.1:{}/{}?sslmode=disable",
            self.addr.port(),
            self.roles.authoritative.settings(&self.config).url.database
        )
    }

    /// A tokio-postgres connection through the proxy as `postgres`.
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Fetches an admin API path (`/status`, `/metrics`, `/health`) with a bare HTTP/1.0 GET.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.admin_request("GET", path, None).await
    }

    /// Posts to an admin API action (`/phase?...`, `/shift?...`), with `token` as the bearer
    /// token when given.
    pub async fn admin_post(&self, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
        self.admin_request("POST", path, token).await
    }

    async fn admin_request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.admin_addr.context("admin API disabled")?;
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        s.write_all(
            format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await??;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("bad HTTP status line")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    }

    /// The admin API's `/status`, parsed.
    pub async fn status(&self) -> anyhow::Result<serde_json::Value> {
        let (code, body) = self.admin_get("/status").await?;
        anyhow::ensure!(code == 200, "/status answered {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// The `reads` of the table named `table` (`schema.name`) in `/status`: counts per store and
    /// fallbacks, while the table is in `read_shift`.
    pub async fn table_reads(&self, table: &str) -> anyhow::Result<serde_json::Value> {
        let status = self.status().await?;
        let tables = status["tables"].as_array().context("no tables in /status")?;
        let t = tables
            .iter()
            .find(|t| t["name"] == table)
            .with_context(|| format!("no table {table} in /status"))?;
        Ok(t["reads"].clone())
    }

    /// Waits until the proxy holds its read lease (its first check runs at start), at most
    /// 10 s; `table` is one in `read_shift`.
    pub async fn wait_for_read_lease(&self, table: &str) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let reads = self.table_reads(table).await?;
            if reads["lease_held"] == true {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no read lease after 10 s: {reads}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a graceful drain.
    pub fn drain(&self, grace: Duration) {
        self.trigger.drain(grace);
    }

    /// Stops at once and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.trigger.immediate();
        self.join().await
    }

    /// Waits for `run` to return (after a drain or stop).
    pub async fn join(&mut self) -> anyhow::Result<()> {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .context("proxy did not stop within 30 s")???;
        }
        Ok(())
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.trigger.immediate();
    }
}
