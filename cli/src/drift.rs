//! `switchyard drift ...`: the drift checker's commands. The library (`switchyard_drift`) does
//! the work; this parses, prints, records and draws a progress bar.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use switchyard_config::{Config, TableSettings};
use switchyard_drift::{DriftTable, Recorded, VerifyOptions, VerifyProgress};
use switchyard_store::{Role, Store};

use crate::{current_thread_runtime, load_for_check, EXIT_NOT_CHECKED};

#[derive(Debug, Subcommand)]
pub(crate) enum DriftCommand {
    /// Estimate each table's drift from keys drawn at random over both stores' keys.
    Sample {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (`schema.table`; repeatable). Default: every configured table.
        #[arg(long = "table", value_name = "NAME")]
        tables: Vec<String>,
        /// About this many keys per table.
        #[arg(long, default_value_t = 5_000)]
        samples: u64,
        /// Chooses the keys: the same seed draws the same keys. Default: a random one (printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare each table exactly and list every differing key.
    Verify {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (`schema.table`; repeatable). Default: every configured table.
        #[arg(long = "table", value_name = "NAME")]
        tables: Vec<String>,
        /// Keys per hashed range.
        #[arg(long, default_value_t = 10_000)]
        chunk_rows: u64,
        /// Ranges compared at once (each on both stores at the same time; at most 8).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=8))]
        workers: u16,
        /// At most this many rows read per second (both stores together); 0 for no limit.
        #[arg(long, default_value_t = 0)]
        max_rows_per_sec: u64,
        /// Start over instead of taking over an unfinished verify of the same table.
        #[arg(long)]
        restart: bool,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sample every table on a schedule and record each result, until SIGINT or SIGTERM
    /// (exit 0). Proxies show the latest figures at /status and as metrics.
    Watch {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (`schema.table`; repeatable). Default: every configured table.
        #[arg(long = "table", value_name = "NAME")]
        tables: Vec<String>,
        /// Seconds between rounds.
        #[arg(long, default_value_t = 300)]
        every: u64,
        /// About this many keys per table and round.
        #[arg(long, default_value_t = 5_000)]
        samples: u64,
    },
    /// Re-copy differing keys from OLD by the mirror's repair path (row locks, higher
    /// versions, tombstones for keys OLD does not have). Keys that no longer differ when read
    /// again are left alone. Exit 0 when no confirmed key still differs afterwards.
    Repair {
        /// Configuration file (TOML); `SWITCHYARD_`-prefixed environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (`schema.table`; repeatable). Default: every configured table.
        #[arg(long = "table", value_name = "NAME")]
        tables: Vec<String>,
        /// Repair the keys the latest recorded `drift verify` found, instead of verifying now.
        #[arg(long)]
        from_verify: bool,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The stores as the drift checker reads them, and who records.
struct Checker {
    old: Store,
    new: Store,
    by: String,
}

/// `switchyard drift ...`: exit 0 when no difference was found, 1 when some was, 2 when the
/// check could not run.
pub(crate) fn run(action: DriftCommand) -> anyhow::Result<ExitCode> {
    let (file, names) = match &action {
        DriftCommand::Sample { config, tables, .. }
        | DriftCommand::Verify { config, tables, .. }
        | DriftCommand::Repair { config, tables, .. }
        | DriftCommand::Watch { config, tables, .. } => (config.clone(), tables.clone()),
    };
    let Some(config) = load_for_check(&file) else {
        return Ok(ExitCode::from(EXIT_NOT_CHECKED));
    };
    let runtime = current_thread_runtime()?;
    let result = runtime.block_on(async {
        let checker = Checker {
            old: switchyard_drift::connect(Role::Old, &config.old.url)?,
            new: switchyard_drift::connect(Role::New, &config.new.url)?,
            by: format!("switchyard drift (pid {})", std::process::id()),
        };
        checker.old.ping(config.proxy.connect_timeout).await?;
        checker.new.ping(config.proxy.connect_timeout).await?;
        // Results are recorded with each table's phase as the control state says it.
        let mut config = config.clone();
        if let Some(state) = switchyard_control::read(&checker.old).await? {
            switchyard_control::apply_to(&mut config, &state);
        }
        if let Some(unknown) = names
            .iter()
            .find(|n| !config.tables.iter().any(|t| t.name.to_string() == **n))
        {
            anyhow::bail!("table {unknown} is not in the configuration's [[tables]]");
        }
        let selected: Vec<&TableSettings> = config
            .tables
            .iter()
            .filter(|t| names.is_empty() || names.iter().any(|n| *n == t.name.to_string()))
            .collect();
        let mut tables = Vec::new();
        for settings in selected {
            tables.push(DriftTable::load(&checker.old, &checker.new, settings).await?);
        }
        if let DriftCommand::Watch { every, samples, .. } = &action {
            return checker
                .watch(&tables, *samples, Duration::from_secs((*every).max(1)))
                .await;
        }
        let mut found = 0;
        let mut outputs = Vec::new();
        for table in &tables {
            let (differing, json) = match &action {
                // Runs over every table at once, above.
                DriftCommand::Watch { .. } => continue,
                DriftCommand::Sample {
                    samples, seed, json, ..
                } => (checker.sample(table, *samples, *seed, *json).await?, *json),
                DriftCommand::Verify {
                    chunk_rows,
                    workers,
                    max_rows_per_sec,
                    restart,
                    json,
                    ..
                } => {
                    let options = VerifyOptions {
                        chunk_rows: *chunk_rows,
                        workers: usize::from(*workers),
                        max_rows_per_sec: *max_rows_per_sec,
                        resume: !*restart,
                        ..VerifyOptions::default()
                    };
                    (checker.verify(table, options, *json).await?, *json)
                }
                DriftCommand::Repair {
                    from_verify, json, ..
                } => (checker.repair(&config, table, *from_verify, *json).await?, *json),
            };
            found += differing.0;
            if json {
                outputs.push(differing.1);
            }
        }
        if !outputs.is_empty() {
            println!("{}", serde_json::to_string_pretty(&outputs)?);
        }
        anyhow::Ok(found)
    });
    match result {
        Ok(0) => Ok(ExitCode::SUCCESS),
        Ok(_) => Ok(ExitCode::FAILURE),
        Err(e) => {
            eprintln!("switchyard drift: {e:#}");
            Ok(ExitCode::from(EXIT_NOT_CHECKED))
        }
    }
}

/// What one table's check found: differing keys, and the result as JSON.
type Found = (u64, serde_json::Value);

impl Checker {
    async fn sample(
        &self,
        table: &DriftTable,
        samples: u64,
        seed: Option<u64>,
        json: bool,
    ) -> anyhow::Result<Found> {
        let seed = seed.unwrap_or_else(switchyard_drift::random_seed);
        let r =
            switchyard_drift::sample(&self.old, &self.new, table, samples, seed, Default::default()).await?;
        switchyard_drift::record(&self.new, Recorded::Sample(&r), table.phase, &self.by).await?;
        if !json {
            println!(
                "{}: {} of {} sampled keys differ: rate {:.4}% (95% CI {:.4}%..{:.4}%); \
                 {} missing in NEW, {} extra in NEW, {} values differ; rows OLD {}, NEW {}; {:.2} s (seed {seed})",
                r.table,
                r.differing,
                r.sampled,
                r.rate * 100.0,
                r.ci95_low * 100.0,
                r.ci95_high * 100.0,
                r.missing_in_new,
                r.extra_in_new,
                r.value_differs,
                r.rows_old,
                r.rows_new,
                r.seconds
            );
        }
        Ok((r.differing, serde_json::to_value(&r)?))
    }

    async fn verify(&self, table: &DriftTable, options: VerifyOptions, json: bool) -> anyhow::Result<Found> {
        let bar = std::io::stderr()
            .is_terminal()
            .then(|| progress_bar(table, options.progress.clone()));
        let result = switchyard_drift::verify(&self.old, &self.new, table, &options, &self.by).await;
        if let Some((bar, ticker)) = bar {
            ticker.abort();
            bar.finish_and_clear();
        }
        let r = result?;
        switchyard_drift::record(&self.new, Recorded::Verify(&r), table.phase, &self.by).await?;
        let cleared = switchyard_drift::clear_verify_mark(&self.old, &r).await?;
        if !json {
            if r.resumed {
                println!(
                    "{}: took over an unfinished verify ({} of {} ranges already compared)",
                    r.table, r.resumed_ranges, r.chunks
                );
            }
            if cleared {
                println!(
                    "{}: equal on both stores; its verification mark is cleared",
                    r.table
                );
            }
            println!(
                "{}: {} differing keys ({} missing in NEW, {} extra in NEW, {} values differ); \
                 rows OLD {}, NEW {}; {} ranges; {:.2} s, {:.0} rows/s",
                r.table,
                r.differing,
                r.missing_in_new,
                r.extra_in_new,
                r.value_differs,
                r.rows_old,
                r.rows_new,
                r.chunks,
                r.seconds,
                r.rows_per_sec
            );
            for k in &r.differing_keys {
                println!("  {} {}", k.kind.as_str(), k.key.join(", "));
            }
        }
        Ok((r.differing, serde_json::to_value(&r)?))
    }

    async fn repair(
        &self,
        config: &Config,
        table: &DriftTable,
        from_verify: bool,
        json: bool,
    ) -> anyhow::Result<Found> {
        let keys = if from_verify {
            switchyard_drift::latest_verify_keys(&self.new, &table.name.to_string())
                .await?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "table {}: no verify recorded; run `switchyard drift verify` first",
                        table.name
                    )
                })?
        } else {
            let options = VerifyOptions::default();
            let r = switchyard_drift::verify(&self.old, &self.new, table, &options, &self.by).await?;
            switchyard_drift::record(&self.new, Recorded::Verify(&r), table.phase, &self.by).await?;
            r.differing_keys
        };
        let authoritative = Store::connect_lazy(Role::Old, &config.old.url)?;
        let follower = Store::connect_lazy(Role::New, &config.new.url)?;
        let r = switchyard_drift::repair(
            (&authoritative, &follower),
            (&self.old, &self.new),
            table,
            &keys,
            Default::default(),
        )
        .await?;
        if !json {
            println!(
                "{}: {} keys given, {} still differed, {} repaired, {} still differ",
                r.table, r.candidates, r.confirmed, r.repaired, r.remaining
            );
        }
        Ok((r.remaining, serde_json::to_value(&r)?))
    }

    /// `drift watch`: a sample of every table each round, recorded, until SIGINT or SIGTERM.
    async fn watch(&self, tables: &[DriftTable], samples: u64, every: Duration) -> anyhow::Result<u64> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        loop {
            for table in tables {
                let seed = switchyard_drift::random_seed();
                match switchyard_drift::sample(&self.old, &self.new, table, samples, seed, Default::default())
                    .await
                {
                    Ok(r) => {
                        switchyard_drift::record(&self.new, Recorded::Sample(&r), table.phase, &self.by)
                            .await?;
                        println!(
                            "{}: {} of {} sampled keys differ: rate {:.4}% (95% CI {:.4}%..{:.4}%)",
                            r.table,
                            r.differing,
                            r.sampled,
                            r.rate * 100.0,
                            r.ci95_low * 100.0,
                            r.ci95_high * 100.0
                        );
                    }
                    // A store that is down for a round is reported; the next round tries again.
                    Err(e) => eprintln!("switchyard drift watch: {}: {e}", table.name),
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = term.recv() => return Ok(0),
                _ = int.recv() => return Ok(0),
            }
        }
    }
}

/// A bar over `progress`'s ranges, with rows per second, redrawn by a ticker task.
fn progress_bar(
    table: &DriftTable,
    progress: Arc<VerifyProgress>,
) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} ranges, {wide_msg} ({elapsed}, eta {eta})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bar = indicatif::ProgressBar::new(0)
        .with_style(style)
        .with_prefix(table.name.to_string());
    let shown = bar.clone();
    let started = std::time::Instant::now();
    let ticker = tokio::spawn(async move {
        loop {
            shown.set_length(progress.ranges_total.load(Ordering::Relaxed));
            shown.set_position(progress.ranges_done.load(Ordering::Relaxed));
            let rows = progress.rows.load(Ordering::Relaxed);
            let rate = rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
            shown.set_message(format!("{rows} rows, {rate:.0} rows/s"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (bar, ticker)
}
