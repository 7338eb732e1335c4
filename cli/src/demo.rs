//! `switchyard demo`: the migration journey on the local PostgreSQL, in one command. Two fresh
//! databases (OLD with a small shop's data, NEW with its empty tables), two proxies in this
//! process, a client workload through both that checks its own reads, and the operator's
//! steps run as the real commands (this binary's subcommands, in child processes): prepare,
//! backfill, drift sample and verify, shadow_read, read_shift at 10, 50 and 100%, cutover,
//! rollback, cutover again, a final comparison, done and cleanup. One line per
//! step with what it measured, the status page's address while it runs, a verdict, and the
//! databases dropped at the end (`--keep` leaves everything running until Ctrl-C).

use std::io::IsTerminal;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use switchyard_config::Config;
use tokio_postgres::NoTls;

/// Options of `switchyard demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// The PostgreSQL server to create the two databases on: a URL to any database there.
    #[arg(
        long,
        env = "SWITCHYARD_DEMO_PG",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg: String,
    /// Leave the databases and the proxies running at the end, until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Client sessions of the workload (half through each proxy).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds the workload runs at each read share.
    #[arg(long, default_value_t = 3)]
    step_secs: u64,
    /// Customers seeded on OLD (with two orders each, three lines per order).
    #[arg(long, default_value_t = 2_000)]
    customers: u64,
}

const TABLES: [&str; 4] = [
    "public.customers",
    "public.orders",
    "public.order_lines",
    "public.events",
];

/// The shop's schema; NEW gets it without foreign keys (they are added after the backfill in a
/// real migration: rows arrive there in no particular order).
fn schema(foreign_keys: bool) -> String {
    let (fk_customer, fk_order) = if foreign_keys {
        (
            " REFERENCES customers (id)",
            " REFERENCES orders (id) ON DELETE CASCADE",
        )
    } else {
        ("", "")
    };
    format!(
        "CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
         CREATE TABLE customers (id bigserial PRIMARY KEY, name text NOT NULL, email text NOT NULL,
             created timestamptz NOT NULL DEFAULT now());
         CREATE TABLE orders (id serial PRIMARY KEY, customer_id bigint NOT NULL{fk_customer},
             status order_status NOT NULL DEFAULT 'new', total numeric(12,2) NOT NULL DEFAULT 0,
             created timestamptz NOT NULL DEFAULT now());
         CREATE TABLE order_lines (order_id int NOT NULL{fk_order}, line_no int NOT NULL,
             sku text NOT NULL, qty int NOT NULL, price numeric(10,2) NOT NULL,
             PRIMARY KEY (order_id, line_no));
         CREATE TABLE events (id bigserial PRIMARY KEY, kind text NOT NULL, payload jsonb NOT NULL,
             at timestamptz NOT NULL DEFAULT now());"
    )
}

fn seed(customers: u64) -> String {
    format!(
        "INSERT INTO customers (name, email) SELECT 'customer ' || i, 'c' || i || '@example.com'
             FROM generate_series(1, {customers}) i;
         INSERT INTO orders (customer_id, status, total)
             SELECT 1 + i % {customers}, (enum_range(NULL::order_status))[1 + i % 4], 0
             FROM generate_series(1, {orders}) i;
         INSERT INTO order_lines SELECT o.id, l, 'sku-' || (o.id * 7 + l) % 500, 1 + l, 9.99 * l
             FROM orders o, generate_series(1, 3) l;
         UPDATE orders o SET total = s.t FROM (SELECT order_id, sum(qty * price) t FROM order_lines
             GROUP BY 1) s WHERE s.order_id = o.id;
         INSERT INTO events (kind, payload) SELECT 'seed', jsonb_build_object('n', i)
             FROM generate_series(1, {customers}) i;",
        orders = customers * 2
    )
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let Some((server, _)) = base.rsplit_once('/').filter(|(s, _)| s.contains("://")) else {
        bail!("--pg {url:?} is not a postgres:// URL with a database");
    };
    Ok(format!("{server}/{db}{query}"))
}

/// What the workload saw.
#[derive(Default)]
struct Tally {
    commits: AtomicU64,
    reads: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Every acknowledged order and its total.
    acknowledged: Mutex<Vec<(i32, String)>>,
}

impl Tally {
    fn failed(&self, what: String) {
        self.errors.fetch_add(1, Relaxed);
        if let Ok(mut e) = self.first_error.lock() {
            e.get_or_insert(what);
        }
    }
}

/// One client: places orders and pays some of them, reading each write back at once
/// (read-your-writes) and never seeing an order's status go back (monotonic reads).
async fn client(url: String, seed: u64, customers: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let (mut c, conn) = match tokio_postgres::connect(&url, NoTls).await {
        Ok(x) => x,
        Err(e) => return tally.failed(format!("connect: {e}")),
    };
    tokio::spawn(conn);
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut mine: Vec<(i32, bool)> = Vec::new();
    while !stop.load(Relaxed) {
        let roll = next() % 10;
        let result: Result<(), String> = async {
            if roll < 6 || mine.is_empty() {
                let customer = (1 + next() % customers) as i64;
                let lines = 1 + (next() % 3) as i32;
                let t = c.transaction().await.map_err(|e| format!("begin: {e}"))?;
                let id: i32 = t
                    .query_one("INSERT INTO orders (customer_id) VALUES ($1) RETURNING id", &[&customer])
                    .await
                    .map_err(|e| format!("order: {e}"))?
                    .get(0);
                t.execute(
                    "INSERT INTO order_lines SELECT $1, n, 'sku-' || n, n, 4.50 * n FROM generate_series(1, $2) n",
                    &[&id, &lines],
                )
                .await
                .map_err(|e| format!("order lines: {e}"))?;
                t.execute(
                    "INSERT INTO events (kind, payload) VALUES ('order', jsonb_build_object('order', $1::int))",
                    &[&id],
                )
                .await
                .map_err(|e| format!("event: {e}"))?;
                let total: String = t
                    .query_one(
                        "UPDATE orders SET total = (SELECT sum(qty * price) FROM order_lines WHERE order_id = $1) \
                         WHERE id = $1 RETURNING total::text",
                        &[&id],
                    )
                    .await
                    .map_err(|e| format!("order total: {e}"))?
                    .get(0);
                t.commit().await.map_err(|e| format!("commit: {e}"))?;
                tally.commits.fetch_add(1, Relaxed);
                let back = c
                    .query_opt("SELECT total::text FROM orders WHERE id = $1", &[&id])
                    .await
                    .map_err(|e| format!("read back: {e}"))?;
                tally.reads.fetch_add(1, Relaxed);
                match back {
                    Some(r) if r.get::<_, String>(0) == total => {}
                    other => return Err(format!("order {id}: wrote total {total}, read {:?}", other.map(|r| r.get::<_, String>(0)))),
                }
                if let Ok(mut a) = tally.acknowledged.lock() {
                    a.push((id, total));
                }
                mine.push((id, false));
            } else if roll < 8 {
                let i = (next() % mine.len() as u64) as usize;
                let id = mine[i].0;
                c.execute("UPDATE orders SET status = 'paid' WHERE id = $1", &[&id])
                    .await
                    .map_err(|e| format!("pay: {e}"))?;
                tally.commits.fetch_add(1, Relaxed);
                mine[i].1 = true;
                let status: String = c
                    .query_one("SELECT status::text FROM orders WHERE id = $1", &[&id])
                    .await
                    .map_err(|e| format!("read back: {e}"))?
                    .get(0);
                tally.reads.fetch_add(1, Relaxed);
                if status != "paid" {
                    return Err(format!("order {id}: paid, read {status}"));
                }
            } else {
                let i = (next() % mine.len() as u64) as usize;
                let (id, paid) = mine[i];
                let row = c
                    .query_one(
                        "SELECT status::text, (SELECT count(*) FROM order_lines WHERE order_id = $1) \
                         FROM orders WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                tally.reads.fetch_add(1, Relaxed);
                let status: String = row.get(0);
                if paid && status != "paid" {
                    return Err(format!("order {id}: was paid, now reads {status}"));
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tally.failed(e);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs this binary's subcommand `args` (`--json` output parsed); stderr shows on a terminal
/// (progress bars), else it is kept, and given with the exit status when the command failed
/// without a JSON answer.
async fn step(args: &[&str]) -> anyhow::Result<(bool, Value)> {
    let exe = std::env::current_exe().context("cannot find the switchyard binary")?;
    let stderr = if std::io::stderr().is_terminal() {
        Stdio::inherit()
    } else {
        Stdio::piped()
    };
    let out = tokio::process::Command::new(exe)
        .args(args)
        .stderr(stderr)
        .output()
        .await
        .with_context(|| format!("cannot run switchyard {}", args.join(" ")))?;
    let mut json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() && json.is_null() {
        let text = String::from_utf8_lossy(&out.stderr);
        let tail: String = text
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        json = serde_json::json!({"exit": out.status.code(), "stderr": tail.trim()});
    }
    Ok((out.status.success(), json))
}

fn line(n: usize, name: &str, text: &str) {
    println!("[{n:>2}] {name:<22} {text}");
}

/// The proxies' `/status`.
async fn status(admin: std::net::SocketAddr) -> anyhow::Result<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(b"GET /status HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await?;
    let text = String::from_utf8_lossy(&body);
    let json = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(serde_json::from_str(json)?)
}

/// Sums `tables[].{path}` over both proxies' `/status`.
async fn sum_status(admins: &[std::net::SocketAddr], pick: impl Fn(&Value) -> u64) -> u64 {
    let mut total = 0;
    for a in admins {
        if let Ok(s) = status(*a).await {
            if let Some(tables) = s["tables"].as_array() {
                total += tables.iter().map(&pick).sum::<u64>();
            }
        }
    }
    total
}

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(journey(args))
}

async fn journey(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let tag = format!("{}_{:04x}", std::process::id(), rand_u16());
    let (old_db, new_db) = (
        format!("switchyard_demo_{tag}_old"),
        format!("switchyard_demo_{tag}_new"),
    );
    let (admin, conn) = tokio_postgres::connect(&args.pg, NoTls).await.with_context(|| {
        format!(
            "cannot reach PostgreSQL at {} (set --pg or SWITCHYARD_DEMO_PG)",
            redact(&args.pg)
        )
    })?;
    tokio::spawn(conn);
    for db in [&old_db, &new_db] {
        admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
    }
    let dir = std::env::temp_dir().join(format!("switchyard-demo-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let result = walk(&args, &dir, (&old_db, &new_db), started).await;
    let keep = args.keep && result.is_ok();
    if !keep {
        for db in [&old_db, &new_db] {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn walk(
    args: &DemoArgs,
    dir: &Path,
    (old_db, new_db): (&str, &str),
    started: Instant,
) -> anyhow::Result<ExitCode> {
    let old_url = with_database(&args.pg, old_db)?;
    let new_url = with_database(&args.pg, new_db)?;
    let mut n = 0;
    let mut next = |name: &str, text: &str| {
        n += 1;
        line(n, name, text);
    };

    // The shop.
    let t = Instant::now();
    for (url, fk) in [(&old_url, true), (&new_url, false)] {
        let (c, conn) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(conn);
        c.batch_execute(&schema(fk)).await?;
    }
    let (old, conn) = tokio_postgres::connect(&old_url, NoTls).await?;
    tokio::spawn(conn);
    old.batch_execute(&seed(args.customers)).await?;
    let rows: i64 = old
        .query_one(
            "SELECT (SELECT count(*) FROM customers) + (SELECT count(*) FROM orders) \
             + (SELECT count(*) FROM order_lines) + (SELECT count(*) FROM events)",
            &[],
        )
        .await?
        .get(0);
    next(
        "databases",
        &format!(
            "{old_db} (OLD, {rows} rows in 4 tables) and {new_db} (NEW, empty) in {:.1} s",
            t.elapsed().as_secs_f64()
        ),
    );

    // The configuration, and prepare.
    let config_path = dir.join("switchyard.toml");
    let mut toml = format!(
        "[old]\nurl = \"{old_url}\"\n\n[new]\nurl = \"{new_url}\"\n\n[proxy]\nlisten = \"127.0.0.1:0\"\n\
         admin_listen = \"127.0.0.1:0\"\n\n[auth]\nmethod = \"trust\"\n\n[mirror]\nstale_intent_secs = 2\n\n"
    );
    for t in TABLES {
        toml.push_str(&format!("[[tables]]\nname = \"{t}\"\nphase = \"dual_write\"\n\n"));
    }
    std::fs::write(&config_path, toml)?;
    let cfg = config_path.to_string_lossy().into_owned();
    let (ok, report) = step(&["prepare", "--config", &cfg, "--json"]).await?;
    if !ok {
        bail!("prepare failed: {report}");
    }
    next(
        "prepare",
        "NEW's tables match OLD's; capture triggers installed on OLD; tables in dual_write",
    );

    // Two proxies, and the workload through them.
    let config = Arc::new(Config::load(&config_path).context("the demo's configuration")?);
    let mut proxies = Vec::new();
    let mut admins = Vec::new();
    let mut clients_at = Vec::new();
    for _ in 0..2 {
        let listeners = switchyard_proxy::Listeners::bind(&config)?;
        let addr = listeners.client_addr().context("the proxy's address")?;
        let admin = listeners.admin_addr().context("the proxy's admin address")?;
        let (trigger, shutdown) = switchyard_proxy::shutdown::channel();
        let c = Arc::clone(&config);
        let task = tokio::spawn(async move { switchyard_proxy::run(c, listeners, shutdown).await });
        proxies.push((trigger, task));
        admins.push(admin);
        clients_at.push(addr);
    }
    next(
        "proxies",
        &format!(
            "two, at {} and {}; status pages http://{}/ and http://{}/",
            clients_at[0], clients_at[1], admins[0], admins[1]
        ),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    for i in 0..args.clients.max(1) {
        let at = clients_at[i % 2];
        let url = format!("postgres://postgres@{}/{old_db}", at);
        workers.push(tokio::spawn(client(
            url,
            0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) * 0x2545_f491),
            args.customers,
            Arc::clone(&stop),
            Arc::clone(&tally),
        )));
    }
    let secs = Duration::from_secs(args.step_secs.max(1));
    tokio::time::sleep(secs).await;
    next(
        "workload",
        &format!(
            "{} clients through both proxies: {} commits so far, each read back at once",
            args.clients.max(1),
            tally.commits.load(Relaxed)
        ),
    );

    // Backfill.
    let t = Instant::now();
    let (ok, report) = step(&["backfill", "--config", &cfg, "--json"]).await?;
    if !ok {
        bail!("backfill failed: {report}");
    }
    let copied: u64 = report["tables"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter_map(|t| t["this_run"]["rows_copied"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    next(
        "backfill",
        &format!(
            "{copied} rows copied in {:.1} s, fenced against the writes mirrored meanwhile",
            t.elapsed().as_secs_f64()
        ),
    );

    // Drift: a sample, then an exact verify.
    let (_, sample) = step(&["drift", "sample", "--config", &cfg, "--samples", "4000", "--json"]).await?;
    let worst = worst_bound(&sample);
    next(
        "drift sample",
        &format!(
            "4 tables, about 4,000 keys each: highest 95% upper bound {}",
            pct(worst)
        ),
    );
    let (_, verify) = step(&["drift", "verify", "--config", &cfg, "--json"]).await?;
    let differing = differing_of(&verify);
    next(
        "drift verify",
        &format!("every row compared: {differing} differing keys"),
    );

    // Shadow reads.
    for t in TABLES {
        phase(&cfg, t, "shadow_read").await?;
    }
    tokio::time::sleep(secs).await;
    let matched = sum_status(&admins, |t| t["shadow_reads"]["match"].as_u64().unwrap_or(0)).await;
    let mismatched = sum_status(&admins, |t| t["shadow_reads"]["mismatch"].as_u64().unwrap_or(0)).await;
    next(
        "shadow_read",
        &format!("{matched} reads also run on NEW and compared: {mismatched} mismatches"),
    );

    // Read shifting.
    for t in TABLES {
        phase(&cfg, t, "read_shift").await?;
    }
    let reads = |s: &'static str| move |t: &Value| t["reads"][s].as_u64().unwrap_or(0);
    for share in ["10", "50", "100"] {
        let (o0, n0) = (
            sum_status(&admins, reads("old")).await,
            sum_status(&admins, reads("new")).await,
        );
        for t in TABLES {
            let (ok, out) = step(&[
                "shift", "--config", &cfg, "--table", t, "--reads", share, "--json",
            ])
            .await?;
            if !ok {
                bail!("shift {t} to {share}% was refused: {out}");
            }
        }
        // Every proxy follows within a poll interval (a notification makes it sooner).
        tokio::time::sleep(secs).await;
        let (o1, n1) = (
            sum_status(&admins, reads("old")).await,
            sum_status(&admins, reads("new")).await,
        );
        next(
            &format!("read_shift {share}%"),
            &format!(
                "eligible reads served: {} by NEW, {} by OLD (sessions are sticky)",
                n1 - n0,
                o1 - o0
            ),
        );
    }
    // Cutover, rollback, cutover again: write authority moves under the barrier.
    for (name, to) in [
        ("cutover", "cutover"),
        ("rollback", "read_shift"),
        ("cutover again", "cutover"),
    ] {
        let before = tally.commits.load(Relaxed);
        // `--force` only over the rail on unconfigured tables: it needs minutes of observed
        // write counters, more than the demo runs (every table of the demo is configured).
        let (ok, out) = step(&[
            "phase", "--config", &cfg, "--table", TABLES[0], "--to", to, "--force", "--json",
        ])
        .await?;
        if !ok {
            bail!("phase --to {to} failed: {out}");
        }
        let unexpected: Vec<&str> = out["overridden"]
            .as_array()
            .map(|o| {
                o.iter()
                    .filter_map(Value::as_str)
                    .filter(|r| !r.contains("not configured"))
                    .collect()
            })
            .unwrap_or_default();
        if !unexpected.is_empty() {
            bail!("cutover needed --force over: {unexpected:?}");
        }
        tokio::time::sleep(secs).await;
        let mut pause: f64 = 0.0;
        for a in &admins {
            if let Ok(s) = status(*a).await {
                pause = pause.max(s["authority"]["last_pause_seconds"].as_f64().unwrap_or(0.0));
            }
        }
        next(
            name,
            &format!(
                "writes now go to {} on both proxies; barrier open {:.2} s, transactions held at most {:.2} s; {} commits since",
                out["authority"].as_str().unwrap_or("?"),
                out["barrier_seconds"].as_f64().unwrap_or(0.0),
                pause,
                tally.commits.load(Relaxed) - before
            ),
        );
    }

    // The verdict: the workload stops, the repairs settle, every row is compared again.
    stop.store(true, Relaxed);
    for w in workers {
        let _ = w.await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, verify) = step(&["drift", "verify", "--config", &cfg, "--restart", "--json"]).await?;
    let final_differing = differing_of(&verify);
    let lost = lost_writes(&old_url, &new_url, &tally).await?;
    let (commits, reads_done, errors) = (
        tally.commits.load(Relaxed),
        tally.reads.load(Relaxed),
        tally.errors.load(Relaxed),
    );
    next(
        "final check",
        &format!(
            "{commits} commits, {reads_done} reads back, {errors} client errors; {final_differing} differing keys; {lost} acknowledged writes missing"
        ),
    );
    // Done: NEW keeps the writes and stops mirroring them; then Switchyard's objects go.
    let (done_ok, done) = step(&[
        "phase", "--config", &cfg, "--table", TABLES[0], "--to", "done", "--json",
    ])
    .await?;
    let (cleaned, _) = step(&["cleanup", "--config", &cfg, "--json"]).await?;
    next(
        "done, cleanup",
        &if done_ok && cleaned {
            format!(
                "NEW alone takes the writes (barrier open {:.2} s); Switchyard's tables, triggers and functions removed from both stores",
                done["barrier_seconds"].as_f64().unwrap_or(0.0)
            )
        } else {
            format!("failed: done {done_ok}, cleanup {cleaned}")
        },
    );
    let pass = final_differing == 0 && lost == 0 && errors == 0 && done_ok && cleaned;
    if let Ok(Some(e)) = tally.first_error.lock().map(|e| e.clone()) {
        println!("     first client error: {e}");
    }
    println!(
        "verdict: {} in {:.0} s",
        if pass { "PASS" } else { "FAIL" },
        started.elapsed().as_secs_f64()
    );
    if args.keep && pass {
        println!(
            "kept running (--keep): config {}; Ctrl-C to stop and keep the databases",
            config_path.display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    for (trigger, task) in proxies {
        trigger.immediate();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn phase(cfg: &str, table: &str, to: &str) -> anyhow::Result<()> {
    let (ok, out) = step(&["phase", "--config", cfg, "--table", table, "--to", to, "--json"]).await?;
    if !ok {
        bail!("phase {table} to {to} was refused: {out}");
    }
    Ok(())
}

/// Acknowledged orders missing, or with another total, on OLD or NEW.
async fn lost_writes(old_url: &str, new_url: &str, tally: &Tally) -> anyhow::Result<usize> {
    let acknowledged = tally.acknowledged.lock().map(|a| a.clone()).unwrap_or_default();
    let ids: Vec<i32> = acknowledged.iter().map(|(id, _)| *id).collect();
    let mut lost = 0;
    for url in [old_url, new_url] {
        let (c, conn) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(conn);
        let rows = c
            .query("SELECT id, total::text FROM orders WHERE id = ANY($1)", &[&ids])
            .await?;
        let found: std::collections::HashMap<i32, String> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        lost += acknowledged
            .iter()
            .filter(|(id, total)| found.get(id) != Some(total))
            .count();
    }
    Ok(lost)
}

fn worst_bound(sample: &Value) -> f64 {
    results(sample)
        .iter()
        .filter_map(|r| r["ci95_high"].as_f64())
        .fold(0.0, f64::max)
}

fn differing_of(verify: &Value) -> u64 {
    results(verify)
        .iter()
        .filter_map(|r| r["differing"].as_u64())
        .sum()
}

fn results(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o
            .get("tables")
            .or_else(|| o.get("results"))
            .and_then(|t| t.as_array().cloned())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn pct(x: f64) -> String {
    format!("{:.3}%", x * 100.0)
}

fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (auth, host) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = auth.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        _ => url.to_owned(),
    }
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t ^ (t >> 16)) as u16
}
