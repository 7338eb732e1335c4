//! `switchyard`: one binary, one subcommand per program.
//!
//! `main` parses the command line, loads and validates the config, sets up telemetry and calls
//! the library's `run`. Everything else lives in the library crates.

mod signals;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard_config::Config;
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
}

/// `prepare`'s exit code when the check itself could not run (bad config, store unreachable,
/// statement failed); 1 means it ran and found mismatches.
const EXIT_NOT_CHECKED: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Proxy { config } => run_proxy(config),
        Command::CheckConfig { file, print } => check_config(file, print),
        Command::Prepare { config, check, json } => prepare(config, check, json),
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
    let _telemetry = telemetry::init(&config.telemetry)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listeners = switchyard_proxy::Listeners::bind(&config)?;
        let (trigger, shutdown) = switchyard_proxy::shutdown::channel();
        signals::spawn_handler(trigger, config.proxy.shutdown_grace)?;
        switchyard_proxy::run(Arc::new(config), listeners, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn prepare(file: PathBuf, check: bool, json: bool) -> anyhow::Result<ExitCode> {
    let config = match Config::load(&file) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return Ok(ExitCode::from(EXIT_NOT_CHECKED));
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let old = Store::connect_lazy(Role::Old, &config.old.url)?;
        let new = Store::connect_lazy(Role::New, &config.new.url)?;
        // A ping first, so an unreachable store is reported with its (redacted) URL.
        old.ping(config.proxy.connect_timeout).await?;
        new.ping(config.proxy.connect_timeout).await?;
        let (Store::Postgres(old), Store::Postgres(new)) = (&old, &new);
        switchyard_store::prepare(old.pool(), new.pool(), &config.tables, !check).await
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
