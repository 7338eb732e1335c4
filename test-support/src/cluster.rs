//! Throwaway PostgreSQL clusters that a test may stop, crash and reconfigure.
//!
//! A [`TestCluster`] lives in `/tmp/sy-cluster-<pid>_<counter>_<random>/`:
//! `data/` (the cluster), `postgres.log`, and the Unix socket. It listens on
//! a free port on 127.0.0.1 with `trust` authentication for everyone until
//! [`TestCluster::set_password_auth`] says otherwise, and runs with
//! `fsync = off`, so it is fast and worthless after a machine crash.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root every
//! PostgreSQL program is started through `runuser -u postgres`.
//!
//! Dropping the cluster stops it (`immediate` mode) and removes the directory.
//! Clusters left behind by a test process that was killed outright are swept
//! the next time any process starts a cluster.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicU64;
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

use crate::db::{connect, process_alive};
use crate::{quote_ident, quote_literal};

/// Parent of every cluster directory. Not `$TMPDIR`: the `postgres` user must
/// be able to reach it.
const CLUSTER_PARENT: &str = "/tmp";
const DIR_PREFIX: &str = "sy-cluster-";
/// OS user that owns and runs clusters when the tests run as root.
const PG_OS_USER: &str = "postgres";
/// Seconds `pg_ctl` waits for start and stop.
const PG_CTL_WAIT_SECS: &str = "60";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at finding a free port when another process takes ours first.
const PORT_ATTEMPTS: usize = 8;

static COUNTER: AtomicU64 = AtomicU64::new(0);
static SWEEP: Once = Once::new();

/// How to configure a [`TestCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `max_prepared_transactions` (0 disables two-phase commit). Default 10.
    pub max_prepared_transactions: u32,
    /// `max_connections`. Default 100.
    pub max_connections: u32,
    /// Further `postgresql.conf` settings, written as `name = 'value'` after
    /// the defaults (so they override them).
    pub settings: Vec<(String, String)>,
    /// `pg_hba.conf` lines placed before every other line (first match wins), e.g.
    /// `hostssl all alice 127.0.0.1/32 trust`.
    pub hba_first: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            max_prepared_transactions: 10,
            max_connections: 100,
            settings: Vec::new(),
            hba_first: Vec::new(),
        }
    }
}

impl ClusterOptions {
    /// Add one `postgresql.conf` setting.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Add a `pg_hba.conf` line before the others.
    pub fn hba_first(mut self, line: impl Into<String>) -> Self {
        self.hba_first.push(line.into());
        self
    }
}

/// A running (or stopped, or crashed) throwaway PostgreSQL cluster.
#[derive(Debug)]
pub struct TestCluster {
    root: PathBuf,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    /// `Some((uid, gid))` of the `postgres` OS user when we run as root.
    run_as: Option<(u32, u32)>,
    port: u16,
    options: ClusterOptions,
    /// `(user, method)` lines for `pg_hba.conf`, from `set_password_auth`.
    password_users: Vec<(String, String)>,
}

impl TestCluster {
    /// `initdb` a new cluster and start it on a free loopback port.
    pub async fn start(options: ClusterOptions) -> anyhow::Result<TestCluster> {
        SWEEP.call_once(sweep_stale_clusters);
        let bin_dir = find_bin_dir()?;
        let run_as = if effective_uid()? == 0 {
            Some(os_user_ids(PG_OS_USER)?)
        } else {
            None
        };
        let root = Path::new(CLUSTER_PARENT).join(format!("{DIR_PREFIX}{}", crate::unique_suffix(&COUNTER)));
        std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        // From here on, Drop removes the directory if anything fails.
        let mut cluster = TestCluster {
            data_dir: root.join("data"),
            root,
            bin_dir,
            run_as,
            port: 0,
            options,
            password_users: Vec::new(),
        };
        cluster.chown(&cluster.root)?;
        cluster.init().await?;
        for attempt in 1..=PORT_ATTEMPTS {
            cluster.port = free_port()?;
            cluster.write_settings()?;
            match cluster.pg_ctl_start().await {
                Ok(()) => break,
                Err(err) if attempt < PORT_ATTEMPTS && cluster.lost_port_race() => {
                    tracing::debug!(port = cluster.port, error = %err, "port taken, retrying");
                }
                Err(err) => return Err(err),
            }
        }
        cluster.wait_ready().await?;
        tracing::debug!(port = cluster.port, dir = %cluster.root.display(), "cluster started");
        Ok(cluster)
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Key-value connection string over the Unix socket, as `postgres`.
    /// Unaffected by [`set_password_auth`](Self::set_password_auth).
    pub fn socket_conninfo(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.root.display(),
            self.port
        )
    }

    /// A client connected over TCP as `postgres` to `db`.
    pub async fn client(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url(db)).await
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (kept across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// Stop the server in `fast` mode: sessions are disconnected, open
    /// transactions roll back, a checkpoint is written.
    /// <https://www.postgresql.org/docs/15/app-pg-ctl.html>
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", PG_CTL_WAIT_SECS])
            .await
            .map(drop)
    }

    /// Start a stopped (or killed) server again on the same port; crash
    /// recovery runs if it was killed. Fails if someone else took the port.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.postmaster_pid() {
            bail!("postmaster {pid} is still running");
        }
        // After `kill` the lock files name a dead postmaster, which may linger
        // as a zombie nobody reaps; the new postmaster would take it for a
        // live one and refuse to start. Nothing of ours runs: remove them.
        let _ = std::fs::remove_file(self.data_dir.join("postmaster.pid"));
        let _ = std::fs::remove_file(self.root.join(format!(".s.PGSQL.{}.lock", self.port)));
        self.pg_ctl_start().await?;
        self.wait_ready().await
    }

    /// `stop` then `start_again`.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// Crash the server: SIGKILL the postmaster and all its children at once,
    /// as a power cut would. Waits until they are gone; connections drop.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let pid = self
            .postmaster_pid()
            .context("no postmaster.pid: server not running")?;
        // Freeze the postmaster first so it cannot fork while we list children.
        signal(&["-STOP"], &[pid]).await?;
        let mut victims = children_of(pid);
        victims.push(pid);
        signal(&["-KILL"], &victims).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while victims.iter().any(|&p| process_alive(p)) {
            ensure!(
                Instant::now() < deadline,
                "processes {victims:?} survived SIGKILL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Freeze the WAL writer (SIGSTOP) until the server is killed or stopped: from then on an
    /// asynchronous commit (`synchronous_commit = off`, this cluster's default) stays in WAL
    /// buffers, and [`kill`](Self::kill) loses it, until some backend flushes the WAL itself (a
    /// synchronous commit, full WAL buffers, a checkpoint). Returns the writer's pid.
    /// <https://www.postgresql.org/docs/15/wal-async-commit.html>
    pub async fn pause_wal_writer(&self) -> anyhow::Result<u32> {
        let client = self.client("postgres").await?;
        let pid: i32 = client
            .query_one(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'",
                &[],
            )
            .await
            .context("finding the WAL writer")?
            .get(0);
        let pid = u32::try_from(pid).context("WAL writer pid")?;
        signal(&["-STOP"], &[pid]).await?;
        Ok(pid)
    }

    /// Wait until the server accepts connections (over its Unix socket).
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let conninfo = self.socket_conninfo("postgres");
        loop {
            match connect(&conninfo).await {
                Ok(client) => {
                    client.simple_query("SELECT 1").await?;
                    return Ok(());
                }
                Err(err) if Instant::now() >= deadline => {
                    return Err(err.context(format!("server not ready; log:\n{}", self.log_tail())));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Create (or update) a login superuser `user` with `password`, stored
    /// with the matching `password_encryption`, and require `method`
    /// (`"md5"`, `"scram-sha-256"` or `"password"`) for `user` over TCP on
    /// 127.0.0.1. Other users keep `trust`; the Unix socket stays `trust`.
    /// Returns once a password-less TCP login as `user` is refused.
    /// <https://www.postgresql.org/docs/15/auth-password.html>
    pub async fn set_password_auth(
        &mut self,
        method: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<()> {
        // md5 auth against a SCRAM verifier silently does SCRAM instead, so
        // store the verifier that matches the method under test.
        let encryption = match method {
            "md5" => "md5",
            "scram-sha-256" | "password" => "scram-sha-256",
            other => bail!("unsupported password method {other:?}"),
        };
        ensure!(
            !user.is_empty() && !user.contains(['"', '\n', '\r']),
            "user name {user:?} cannot be written to pg_hba.conf"
        );
        let admin = connect(&self.socket_conninfo("postgres")).await?;
        let exists = admin
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
            .await?
            .is_some();
        let verb = if exists { "ALTER" } else { "CREATE" };
        admin
            .batch_execute(&format!(
                "SET password_encryption = {}; {verb} ROLE {} LOGIN SUPERUSER PASSWORD {}",
                quote_literal(encryption),
                quote_ident(user),
                quote_literal(password),
            ))
            .await
            .with_context(|| format!("{verb} ROLE {user}"))?;
        self.password_users.retain(|(u, _)| u != user);
        self.password_users.push((user.to_owned(), method.to_owned()));
        self.write_hba()?;
        admin.simple_query("SELECT pg_reload_conf()").await?;

        // The reload is asynchronous: wait until it is in force.
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname("postgres");
        let deadline = Instant::now() + Duration::from_secs(30);
        while config.connect(tokio_postgres::NoTls).await.is_ok() {
            ensure!(Instant::now() < deadline, "pg_hba.conf reload not in force");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Turns TLS on (`ssl = on`) with the PEM certificate and key at `cert` and `key`, and the
    /// CAs whose client certificates it accepts at `client_ca` (copied into the cluster's
    /// directory, readable by the server only), and returns once a new session sees it in force.
    /// <https://www.postgresql.org/docs/current/ssl-tcp.html>
    pub async fn enable_tls(&self, cert: &Path, key: &Path, client_ca: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mut settings = Vec::new();
        for (src, name, setting) in [
            (cert, "server.crt", "ssl_cert_file"),
            (key, "server.key", "ssl_key_file"),
            (client_ca, "client-ca.crt", "ssl_ca_file"),
        ] {
            let dst = self.root.join(name);
            std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600))?;
            self.chown(&dst)?;
            settings.push(format!(
                "ALTER SYSTEM SET {setting} = {}",
                quote_literal(&dst.display().to_string())
            ));
        }
        settings.push("ALTER SYSTEM SET ssl = on".to_owned());
        let admin = connect(&self.socket_conninfo("postgres")).await?;
        for sql in settings {
            admin.batch_execute(&sql).await.with_context(|| sql.clone())?;
        }
        admin.batch_execute("SELECT pg_reload_conf()").await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let client = connect(&self.socket_conninfo("postgres")).await?;
            let on: String = client.query_one("SHOW ssl", &[]).await?.get(0);
            if on == "on" {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "ssl = on not in force; log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn init(&self) -> anyhow::Result<()> {
        let data = self.data_dir.to_string_lossy().into_owned();
        self.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )
        .await?;
        // Our settings live in their own file so they can be rewritten.
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).context("reading postgresql.conf")?;
        text.push_str("\ninclude 'switchyard.conf'\n");
        std::fs::write(&conf, text).context("writing postgresql.conf")?;
        self.write_hba()
    }

    fn write_settings(&self) -> anyhow::Result<()> {
        let o = &self.options;
        let mut text = String::from("# Written by switchyard-test-support.\n");
        let defaults = [
            ("listen_addresses", "127.0.0.1".to_owned()),
            ("port", self.port.to_string()),
            ("unix_socket_directories", self.root.display().to_string()),
            ("fsync", "off".to_owned()),
            ("synchronous_commit", "off".to_owned()),
            ("full_page_writes", "off".to_owned()),
            ("max_connections", o.max_connections.to_string()),
            (
                "max_prepared_transactions",
                o.max_prepared_transactions.to_string(),
            ),
        ];
        let extra = o.settings.iter().map(|(k, v)| (k.as_str(), v.clone()));
        for (name, value) in defaults.into_iter().chain(extra) {
            // postgresql.conf quotes like SQL literals.
            let _ = writeln!(text, "{name} = {}", quote_literal(&value));
        }
        self.write_owned(&self.data_dir.join("switchyard.conf"), &text)
    }

    fn write_hba(&self) -> anyhow::Result<()> {
        // First match wins: per-user password lines go before the trust lines.
        // https://www.postgresql.org/docs/15/auth-pg-hba-conf.html
        let mut text = String::from(
            "# Written by switchyard-test-support.\n\
             local all all trust\n\
             local replication all trust\n",
        );
        for line in &self.options.hba_first {
            let _ = writeln!(text, "{line}");
        }
        for (user, method) in &self.password_users {
            let _ = writeln!(text, "host all \"{user}\" 127.0.0.1/32 {method}");
        }
        text.push_str(
            "host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        );
        self.write_owned(&self.data_dir.join("pg_hba.conf"), &text)
    }

    fn write_owned(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        self.chown(path)
    }

    fn chown(&self, path: &Path) -> anyhow::Result<()> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }

    async fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let log = self.log_path().to_string_lossy().into_owned();
        self.pg_ctl(&["start", "-l", &log, "-w", "-t", PG_CTL_WAIT_SECS])
            .await
            .map(drop)
    }

    /// Whether the last start failed because the port was taken.
    fn lost_port_race(&self) -> bool {
        self.log_tail().contains("Address already in use")
    }

    async fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let data = self.data_dir.to_string_lossy().into_owned();
        let mut all = vec!["-D", &data];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
            .await
            .map_err(|err| err.context(format!("server log:\n{}", self.log_tail())))
    }

    /// Run a PostgreSQL program, as the `postgres` user when we are root.
    async fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.command(program);
        cmd.args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = cmd.output().await.with_context(|| format!("running {program}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "{program} {} failed ({}):\n{stdout}{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(stdout)
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let path = self.bin_dir.join(program);
        if self.run_as.is_some() {
            let mut cmd = tokio::process::Command::new("runuser");
            cmd.args(["-u", PG_OS_USER, "--"]).arg(path);
            cmd
        } else {
            tokio::process::Command::new(path)
        }
    }

    /// The live postmaster of this cluster, if any.
    fn postmaster_pid(&self) -> Option<u32> {
        live_postmaster(&self.data_dir)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            let data = self.data_dir.to_string_lossy().into_owned();
            let stopped = self
                .command("pg_ctl")
                .as_std_mut()
                .args(["-D", &data, "stop", "-m", "immediate", "-w", "-t", "30"])
                .current_dir(&self.root)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if !stopped {
                eprintln!("switchyard-test-support: pg_ctl stop failed; killing {pid}");
                kill_now(pid);
            }
        }
        if let Err(err) = std::fs::remove_dir_all(&self.root) {
            eprintln!("switchyard-test-support: removing {}: {err}", self.root.display());
        }
    }
}

/// Directory holding `initdb` and `pg_ctl`: `SWITCHYARD_PG_BIN`, then `PATH`,
/// then the newest `/usr/lib/postgresql/<major>/bin`.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("SWITCHYARD_PG_BIN") {
        let dir = PathBuf::from(dir);
        ensure!(
            has_tools(&dir),
            "SWITCHYARD_PG_BIN={} lacks initdb/pg_ctl",
            dir.display()
        );
        return Ok(dir);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|d| has_tools(d)) {
        return Ok(dir);
    }
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, dir)| has_tools(dir))
        .collect();
    versioned.sort();
    versioned
        .pop()
        .map(|(_, dir)| dir)
        .context("initdb/pg_ctl not found (set SWITCHYARD_PG_BIN)")
}

/// A port that was free a moment ago; the caller retries if it loses a race.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn effective_uid() -> anyhow::Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    // `Uid:` real, effective, saved, filesystem.
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
        .context("no Uid line in /proc/self/status")
}

fn os_user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&user))
        .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        .with_context(|| format!("OS user {user} not found (PostgreSQL cannot run as root)"))
}

/// The pid in `data_dir/postmaster.pid` if that process is alive and really
/// is a postmaster for `data_dir` (pids are reused after a crash).
fn live_postmaster(data_dir: &Path) -> Option<u32> {
    // The first line of postmaster.pid is the postmaster's pid.
    // https://www.postgresql.org/docs/15/storage-file-layout.html
    let pid: u32 = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = data_dir.as_os_str().as_encoded_bytes();
    let ours = cmdline.windows(needle.len()).any(|w| w == needle);
    (ours && process_alive(pid)).then_some(pid)
}

/// Pids whose parent is `parent`, from `/proc/<pid>/stat`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // `pid (comm) state ppid ...`; comm may contain ')'.
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

async fn signal(flags: &[&str], pids: &[u32]) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("kill")
        .args(flags)
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .status()
        .await
        .context("running kill")?;
    ensure!(status.success(), "kill {flags:?} {pids:?} failed");
    Ok(())
}

/// Blocking SIGKILL for Drop and the sweep; errors are only logged.
fn kill_now(pid: u32) {
    let mut victims = children_of(pid);
    victims.push(pid);
    let result = std::process::Command::new("kill")
        .arg("-KILL")
        .args(victims.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(err) = result {
        eprintln!("switchyard-test-support: kill {pid}: {err}");
    }
}

/// Remove cluster directories whose creating process is gone, killing any
/// server still running in them.
fn sweep_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(CLUSTER_PARENT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('_').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || process_alive(owner) {
            continue;
        }
        let dir = entry.path();
        if let Some(pid) = live_postmaster(&dir.join("data")) {
            kill_now(pid);
        }
        eprintln!(
            "switchyard-test-support: removing stale cluster {}",
            dir.display()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
