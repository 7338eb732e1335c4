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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Proxy { config } => run_proxy(config),
        Command::CheckConfig { file, print } => check_config(file, print),
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
