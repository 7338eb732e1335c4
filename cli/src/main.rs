//! `switchyard`: one binary, one subcommand per program.
//!
//! `main` parses the command line, loads and validates the config, sets up telemetry and calls
//! the library's `run`. Everything else lives in the library crates.

mod control;
mod demo;
mod drift;
mod finish;
mod signals;
mod telemetry;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard_backfill::{BackfillOptions, ProgressMode};
use switchyard_config::{Config, TableName};
use switchyard_store::{PrepareReport, Role, Store, SIDE_SCHEMA};

/// Zero-downtime database migration proxy.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Walk the whole migration journey on the local PostgreSQL in one command: two fresh
    /// databases with a small shop's data, two proxies, a client workload, and the operator's
    /// steps (prepare, backfill, drift, shadow reads, read shifting, cutover, rollback); one line
    /// per step and a verdict. Exit 0 on PASS, 1 on FAIL.
    Demo(demo::DemoArgs),
    /// Run the proxy.
    Proxy {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file (and its users file): exit 0 if valid, 1 if not.
    CheckConfig {
        /// Configuration file to check.
        file: PathBuf,
        /// Print the resolved configuration (passwords redacted) as JSON.
        #[arg(long)]
        print: bool,
    },
    /// Check that NEW's tables match OLD's and create Switchyard's side tables: exit 0 when
    /// ready, 1 with mismatches (nothing created), 2 when the check could not run.
    Prepare {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Only compare; create nothing.
        #[arg(long)]
        check: bool,
        /// Print the report (both schemas of every table, keys, mismatches) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy the rows OLD had before dual writes into NEW, fenced against mirrored writes (tables
    /// without a key: the rows committed before `prepare` installed their capture), resumably:
    /// exit 0 when every table is done, 1 on an error, 3 when stopped by a signal
    /// (state saved; run again to resume).
    Backfill {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (`schema.table`; repeatable). Default: every table in dual_write or
        /// a later phase.
        #[arg(long = "table", value_name = "NAME")]
        tables: Vec<String>,
        /// Chunks copied at once by this process (one connection to each store per worker).
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Rows per chunk (tables without a key: about as many, as a range of blocks).
        #[arg(long, default_value_t = 10_000)]
        chunk_rows: u64,
        /// Read at most this many rows per second, all workers together.
        #[arg(long)]
        max_rows_per_sec: Option<u64>,
        /// Print a JSON summary on stdout at the end.
        #[arg(long)]
        json: bool,
        /// Instead of copying: remove the tombstones of tables whose backfill has finished.
        #[arg(long)]
        cleanup_tombstones: bool,
    },
    /// Measure how far NEW is from OLD: `sample` estimates the share of differing keys with a
    /// 95% interval, `verify` finds every differing key. Results are recorded on NEW. Exit 0 when
    /// no difference was found, 1 when some was, 2 when the check could not run.
    Drift {
        #[command(subcommand)]
        action: drift::DriftCommand,
    },
    /// Move a table to another phase, for every proxy at once (through the control state on
    /// the authoritative store). Exit 0 when done, 1 when refused (the reasons printed), 2 when
    /// it could not be tried.
    Phase {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// The table (`schema.table`).
        #[arg(long)]
        table: String,
        /// The phase: passthrough, dual_write, shadow_read, read_shift, cutover, done.
        #[arg(long)]
        to: switchyard_config::Phase,
        /// Override the guard rails (recorded, with the refusals overridden).
        #[arg(long)]
        force: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set the percent of sessions whose eligible reads NEW serves (in read_shift), for every
    /// proxy at once. Exit codes as for `phase`.
    Shift {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// The table (`schema.table`).
        #[arg(long)]
        table: String,
        /// Percent of sessions, 0 to 100.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
        reads: u8,
        /// Override the guard rails (recorded, with the refusals overridden).
        #[arg(long)]
        force: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set the sequences the configured tables use (serial, identity, `nextval` defaults) past
    /// the authoritative store's on the other store: to its value plus a margin of increments,
    /// never moving one back. Run it before NEW takes writes (OLD to NEW) and before a rollback
    /// to OLD (NEW to OLD). Exit 0 when done, 1 when a sequence could not be set (missing on
    /// the target, out of range), 2 when it could not be tried.
    Sequences {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// The store whose sequences are ahead, for every table. Default, per table: the store
        /// that takes its writes per the control state (NEW once it is in cutover or done),
        /// else OLD.
        #[arg(long, value_enum)]
        from: Option<finish::Side>,
        /// Increments added to the source's value (values it may hand out meanwhile).
        #[arg(long, default_value_t = switchyard_store::sequences::DEFAULT_MARGIN)]
        margin: u32,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove everything Switchyard created (the `switchyard` schema with its side tables,
    /// tombstones, intents, backfill, drift and control state, and the capture triggers on
    /// the migrated tables) from both stores, once every configured table is `done` in the
    /// control state; refused otherwise (exit 1, nothing removed). Running it again is
    /// harmless. Exit 2 when it could not be tried. There is no --force: before `done` these
    /// objects are what makes a rollback lossless.
    Cleanup {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show every configured table's phase and backfill progress (read from NEW).
    Status {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `backfill`'s exit code when a signal stopped it before the end (the state is saved).
const EXIT_INTERRUPTED: u8 = 3;

/// `prepare`'s exit code when the check itself could not run (bad config, store unreachable,
/// statement failed); 1 means it ran and found mismatches.
pub(crate) const EXIT_NOT_CHECKED: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Proxy { config } => run_proxy(config),
        Command::CheckConfig { file, print } => check_config(file, print),
        Command::Prepare { config, check, json } => prepare(config, check, json),
        Command::Backfill {
            config,
            tables,
            workers,
            chunk_rows,
            max_rows_per_sec,
            json,
            cleanup_tombstones,
        } => {
            let options = BackfillOptions {
                tables: Vec::new(),
                workers,
                chunk_rows,
                max_rows_per_sec,
                progress: if std::io::stderr().is_terminal() {
                    ProgressMode::Bar(indicatif::MultiProgress::new())
                } else {
                    ProgressMode::Lines
                },
            };
            backfill(config, tables, options, json, cleanup_tombstones)
        }
        Command::Status { config, json } => status(config, json),
        Command::Phase {
            config,
            table,
            to,
            force,
            json,
        } => control::run(
            &config,
            &table,
            switchyard_control::Target::Phase(to),
            force,
            json,
        ),
        Command::Shift {
            config,
            table,
            reads,
            force,
            json,
        } => control::run(
            &config,
            &table,
            switchyard_control::Target::ReadShare(reads),
            force,
            json,
        ),
        Command::Drift { action } => drift::run(action),
        Command::Sequences {
            config,
            from,
            margin,
            json,
        } => finish::sequences(&config, from, margin, json),
        Command::Cleanup { config, json } => finish::cleanup(&config, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: PathBuf, print: bool) -> anyhow::Result<ExitCode> {
    match Config::load(&file) {
        Ok(config) => {
            if print {
                println!("{}", serde_json::to_string_pretty(&config)?);
            }
            println!("{}: configuration is valid", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run_proxy(file: PathBuf) -> anyhow::Result<ExitCode> {
    let config = Config::load(&file).with_context(|| format!("invalid configuration {}", file.display()))?;
    // Outside the runtime: the OTLP exporters use blocking HTTP clients on their own threads.
    let telemetry = Arc::new(telemetry::init(&config.telemetry)?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let listeners = switchyard_proxy::Listeners::bind(&config)?;
        let (trigger, shutdown) = switchyard_proxy::shutdown::channel();
        let config = Arc::new(config);
        let (reloads_tx, reloads) = tokio::sync::watch::channel(Arc::clone(&config));
        let reload = signals::Reload {
            file,
            telemetry: Arc::clone(&telemetry),
            proxy: reloads_tx,
        };
        signals::spawn_handler(trigger, config.proxy.shutdown_grace, reload)?;
        switchyard_proxy::run_with_reload(config, listeners, shutdown, reloads).await?;
        Ok(ExitCode::SUCCESS)
    });
    // The runtime (and the signal task holding a reference) goes first, then the guard flushes.
    drop(runtime);
    drop(telemetry);
    result
}

fn prepare(file: PathBuf, check: bool, json: bool) -> anyhow::Result<ExitCode> {
    let Some(config) = load_for_check(&file) else {
        return Ok(ExitCode::from(EXIT_NOT_CHECKED));
    };
    let runtime = current_thread_runtime()?;
    let result = runtime.block_on(async {
        let old = Store::connect_lazy(Role::Old, &config.old.url)?;
        let new = Store::connect_lazy(Role::New, &config.new.url)?;
        // A ping first, so an unreachable store is reported with its (redacted) URL.
        old.ping(config.proxy.connect_timeout).await?;
        new.ping(config.proxy.connect_timeout).await?;
        // Phases changed since with `switchyard phase` win over the file's: prepare installs
        // and removes capture triggers by phase.
        let mut config = config.clone();
        // Each table is prepared for the store that takes its writes per the control state:
        // after cutover the capture belongs on NEW, the key records on OLD; with table groups,
        // each group where its own writes are.
        let mut authority_of = std::collections::HashMap::new();
        if let Some(state) = switchyard_control::read(&old).await? {
            for (table, file, control) in switchyard_control::apply_to(&mut config, &state) {
                eprintln!("{table}: the control state says {control} (the file says {file}); preparing for {control}");
            }
            for t in &config.tables {
                let name = t.name.to_string();
                authority_of.insert(name.clone(), switchyard_control::authority_of(&state, &name));
            }
        }
        let (Store::Postgres(pg_old), Store::Postgres(pg_new)) = (&old, &new);
        let mut report = PrepareReport::default();
        for roles in [
            switchyard_store::Roles::OLD_AUTHORITATIVE,
            switchyard_store::Roles::NEW_AUTHORITATIVE,
        ] {
            let tables: Vec<_> = config
                .tables
                .iter()
                .filter(|t| {
                    authority_of.get(&t.name.to_string()).copied().unwrap_or(Role::Old) == roles.authoritative
                })
                .cloned()
                .collect();
            if tables.is_empty() {
                continue;
            }
            let (auth, follower) = match roles.authoritative {
                Role::Old => (pg_old.pool(), pg_new.pool()),
                Role::New => (pg_new.pool(), pg_old.pool()),
            };
            let part = switchyard_store::prepare_in(roles, auth, follower, &tables, !check).await?;
            report.tables.extend(part.tables);
            report.mismatches.extend(part.mismatches);
        }
        // The control state every proxy follows starts from the file's phases and read shares
        // (rows that exist are kept: they hold changes made since).
        if !check && report.is_ready() {
            let by = format!("switchyard prepare (pid {})", std::process::id());
            switchyard_control::seed(&old, &config, &by).await?;
        }
        Ok::<_, switchyard_store::StoreError>(report)
    });
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("switchyard prepare: {e}");
            return Ok(ExitCode::from(EXIT_NOT_CHECKED));
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_prepare_report(&report, check);
    }
    Ok(if report.is_ready() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_prepare_report(report: &PrepareReport, check: bool) {
    for table in &report.tables {
        match &table.keys_table {
            Some(keys_table) => println!(
                "{}: key ({}), keys table {SIDE_SCHEMA}.{keys_table}",
                table.name,
                table.key.join(", ")
            ),
            None => println!("{}: no key, mirrored append-only", table.name),
        }
    }
    for mismatch in &report.mismatches {
        println!("{mismatch}");
    }
    match (report.mismatches.len(), check) {
        (0, false) => println!("ready: side tables are in place on OLD and NEW"),
        (0, true) => println!("ready (--check: nothing was created)"),
        (1, _) => println!("1 mismatch: nothing was created"),
        (n, _) => println!("{n} mismatches: nothing was created"),
    }
}

/// A log line written while progress bars are shown: the bars are cleared, the line written,
/// the bars drawn again below it.
struct AboveBars(indicatif::MultiProgress);

impl std::io::Write for AboveBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer writes each event in one call.
        self.0.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Logs for the batch commands go to stderr, so stdout carries only their report (`--json`).
/// While progress bars are drawn (`bars`), log lines go above them, and only warnings and
/// errors are logged unless `RUST_LOG` says otherwise.
fn init_stderr_logs(config: &Config, bars: Option<&indicatif::MultiProgress>) -> anyhow::Result<()> {
    let bar = bars.is_some();
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => EnvFilter::try_new(directive)?,
        // sqlx logs every NOTICE (`... already exists, skipping`) at info.
        _ if bar => EnvFilter::try_new("warn")?,
        _ => EnvFilter::try_new(format!("{},sqlx=warn", config.telemetry.log_level))?,
    };
    let bars = bars.cloned();
    let writer = move || -> Box<dyn std::io::Write> {
        match &bars {
            Some(bars) => Box::new(AboveBars(bars.clone())),
            None => Box::new(std::io::stderr()),
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    let installed = match config.telemetry.log_format {
        switchyard_config::LogFormat::Json => builder.json().try_init(),
        switchyard_config::LogFormat::Text => builder.try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("{e}"))
}

fn batch_runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.clamp(1, 4))
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// First SIGINT or SIGTERM: finish the chunks in flight and stop; a second one: roll them back
/// and stop now.
fn spawn_backfill_signals(trigger: switchyard_backfill::StopTrigger) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if trigger.level() == switchyard_backfill::stop::StopLevel::Running {
                tracing::warn!("{name}: stopping after the chunks in flight (again to stop at once)");
                trigger.graceful();
            } else {
                tracing::warn!("{name}: rolling back the chunks in flight and stopping");
                trigger.immediate();
            }
        }
    });
    Ok(())
}

fn backfill(
    file: PathBuf,
    tables: Vec<String>,
    mut options: BackfillOptions,
    json: bool,
    cleanup: bool,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(&file).with_context(|| format!("invalid configuration {}", file.display()))?;
    for t in &tables {
        options.tables.push(
            t.parse::<TableName>()
                .map_err(|e| anyhow::anyhow!("--table {t}: {e}"))?,
        );
    }
    let bars = match &options.progress {
        ProgressMode::Bar(bars) if !cleanup => Some(bars),
        _ => None,
    };
    init_stderr_logs(&config, bars)?;
    let runtime = batch_runtime(options.workers)?;
    // Phases changed with `switchyard phase` win over the file's (a table whose dual writes
    // started at run time is backfilled).
    let config = runtime.block_on(with_control_phases(config));
    if cleanup {
        let result = runtime.block_on(switchyard_backfill::cleanup_tombstones(&config, &options.tables));
        return match result {
            Ok(reports) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&reports)?);
                } else {
                    for r in &reports {
                        println!("{}: {} tombstones removed", r.table, r.removed);
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => batch_failed("backfill --cleanup-tombstones", &e, json),
        };
    }
    let result = runtime.block_on(async {
        let (trigger, stop) = switchyard_backfill::stop_channel();
        spawn_backfill_signals(trigger)
            .map_err(|e| switchyard_backfill::BackfillError::BadOption(e.to_string()))?;
        switchyard_backfill::run(&config, &options, stop).await
    });
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => return batch_failed("backfill", &e, json),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for t in &summary.tables {
            let total = t.total.as_ref();
            println!(
                "{}: {} ({} rows read, {} copied, {} fenced this run; {} of {} chunks copied in all)",
                t.table,
                t.status,
                t.this_run.rows_read,
                t.this_run.rows_copied,
                t.this_run.rows_skipped,
                total.map_or(0, |p| p.chunks_done),
                total.map_or(0, |p| p.chunks_planned),
            );
        }
        println!(
            "{} in {:.1}s, {} rows/s",
            match summary.status {
                switchyard_backfill::progress::RunStatus::Done => "backfill complete",
                switchyard_backfill::progress::RunStatus::Interrupted =>
                    "backfill stopped (run again to resume)",
            },
            summary.elapsed_secs,
            summary.rows_per_sec
        );
    }
    Ok(match summary.status {
        switchyard_backfill::progress::RunStatus::Done => ExitCode::SUCCESS,
        switchyard_backfill::progress::RunStatus::Interrupted => ExitCode::from(EXIT_INTERRUPTED),
    })
}

/// Reports a failed batch command on stderr (and as JSON on stdout with `--json`); exit 1.
fn batch_failed(
    what: &str,
    error: &switchyard_backfill::BackfillError,
    json: bool,
) -> anyhow::Result<ExitCode> {
    eprintln!("switchyard {what}: {error}");
    if json {
        let report = serde_json::json!({
            "status": "failed",
            "error": error.to_string(),
            "kind": error.kind(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(ExitCode::FAILURE)
}

fn status(file: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(&file).with_context(|| format!("invalid configuration {}", file.display()))?;
    init_stderr_logs(&config, None)?;
    let runtime = batch_runtime(1)?;
    let tables = match runtime.block_on(switchyard_backfill::status(&config)) {
        Ok(tables) => tables,
        Err(e) => return batch_failed("status", &e, json),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&tables)?);
        return Ok(ExitCode::SUCCESS);
    }
    let width = tables.iter().map(|t| t.table.len()).max().unwrap_or(0);
    for t in &tables {
        let backfill = match &t.backfill {
            None => "backfill not started".to_owned(),
            Some(p) if p.status == "done" => format!(
                "backfill done: {} rows read, {} copied, {} fenced, {} chunks, finished {}{}",
                p.rows_read,
                p.rows_copied,
                p.rows_skipped,
                p.chunks_done,
                p.finished_at.as_deref().unwrap_or("?"),
                p.tombstones_cleaned_at
                    .as_deref()
                    .map(|at| format!(", tombstones cleaned {at}"))
                    .unwrap_or_default(),
            ),
            Some(p) => {
                let estimate = p.rows_estimated.unwrap_or(0).max(p.rows_read);
                let percent = if estimate > 0 {
                    p.rows_read * 100 / estimate
                } else {
                    0
                };
                format!(
                    "backfill running: {percent}% ({} of ~{estimate} rows), {} of {}{} chunks copied, {} fenced, \
                     started {}",
                    p.rows_read,
                    p.chunks_done,
                    p.chunks_planned,
                    if p.planning_done { "" } else { "+" },
                    p.rows_skipped,
                    p.started_at,
                )
            }
        };
        println!("{:<width$}  {:<11}  {backfill}", t.table, t.phase.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

/// The configuration of a command that exits 2 when it could not check (the reason printed).
pub(crate) fn load_for_check(file: &std::path::Path) -> Option<Config> {
    Config::load(file)
        .map_err(|e| eprintln!("{}: {e}", file.display()))
        .ok()
}

pub(crate) fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `config` with the phases and read shares of the control state on OLD, when there is one and
/// it can be read (else the file's, as before `switchyard prepare` seeded it).
async fn with_control_phases(mut config: Config) -> Config {
    let Ok(old) = Store::connect_lazy(Role::Old, &config.old.url) else {
        return config;
    };
    if let Ok(Some(state)) = switchyard_control::read(&old).await {
        switchyard_control::apply_to(&mut config, &state);
    }
    config
}
