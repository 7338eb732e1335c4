//! `switchyard phase` and `switchyard shift`: change a table's phase or read share in the
//! control state every proxy follows (`switchyard_control`), after its guard rails.

use std::path::Path;
use std::process::ExitCode;

use switchyard_config::TableName;
use switchyard_control::switch::Applied;
use switchyard_control::{ControlError, Request, Target};
use switchyard_store::{Role, Store};

use crate::{current_thread_runtime, load_for_check, EXIT_NOT_CHECKED};

/// Exit 0 when the change was made (or there was nothing to change), 1 when it was refused (the
/// reasons printed), 2 when it could not be tried.
pub(crate) fn run(
    file: &Path,
    table: &str,
    target: Target,
    force: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let Some(config) = load_for_check(file) else {
        return Ok(ExitCode::from(EXIT_NOT_CHECKED));
    };
    let table: TableName = match table.parse() {
        Ok(t) if config.tables.iter().any(|c| c.name == t) => t,
        Ok(t) => {
            eprintln!("switchyard: table {t} is not in the configuration's [[tables]]");
            return Ok(ExitCode::from(EXIT_NOT_CHECKED));
        }
        Err(e) => {
            eprintln!("switchyard: --table {table}: {e}");
            return Ok(ExitCode::from(EXIT_NOT_CHECKED));
        }
    };
    let runtime = current_thread_runtime()?;
    let by = format!(
        "{} (pid {}, user {})",
        match target {
            Target::Phase(_) => "switchyard phase",
            Target::ReadShare(_) => "switchyard shift",
        },
        std::process::id(),
        std::env::var("USER").unwrap_or_else(|_| "?".to_owned())
    );
    let result = runtime.block_on(async {
        // The control state lives on the authoritative store: OLD until cutover.
        let authoritative = Store::connect_lazy(Role::Old, &config.old.url)?;
        let new = switchyard_drift::connect(Role::New, &config.new.url)?;
        authoritative.ping(config.proxy.connect_timeout).await?;
        new.ping(config.proxy.connect_timeout).await?;
        switchyard_control::seed(&authoritative, &config, &by).await?;
        let request = Request {
            table: &table,
            target,
            by: &by,
            force,
        };
        let applied = switchyard_control::switch::apply(&authoritative, &new, &config, &request).await?;
        anyhow::Ok(applied)
    });
    match result {
        Ok(Applied::Switched(s)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "every configured table -> {} (epoch {}); writes now go to {}; barrier held {:.3} s with {} proxies",
                    s.to, s.epoch, s.authority, s.barrier_seconds, s.proxies
                );
                let steps: Vec<String> = s
                    .steps
                    .iter()
                    .map(|t| format!("{} {:.0} ms", t.step, t.ms))
                    .collect();
                println!("  under the barrier: {}", steps.join(", "));
                for m in s.sequences.iter().filter(|m| m.moved) {
                    println!(
                        "  sequence {}: {} -> {}",
                        m.sequence, m.target_before, m.target_after
                    );
                }
                for r in &s.overridden {
                    println!("  forced over: {r}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Ok(Applied::Changed(c)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else if c.from == c.to {
                println!(
                    "{}: {} is already {} (epoch {})",
                    c.table, c.change, c.to, c.epoch
                );
            } else {
                println!(
                    "{}: {} {} -> {} (epoch {})",
                    c.table, c.change, c.from, c.to, c.epoch
                );
                for r in &c.overridden {
                    println!("  forced over: {r}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => match e.downcast::<ControlError>() {
            Ok(ControlError::Refused { table, reasons }) => {
                if json {
                    let v = serde_json::json!({"table": table, "refused": reasons});
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!("{table}: refused:");
                    for r in &reasons {
                        println!("  - {r}");
                    }
                    println!("  (--force overrides; it is recorded with these reasons)");
                }
                Ok(ExitCode::FAILURE)
            }
            Ok(ControlError::NotAllowed { table, reason }) => {
                eprintln!("switchyard: table {table}: {reason}");
                Ok(ExitCode::FAILURE)
            }
            Ok(other) => {
                eprintln!("switchyard: {other}");
                Ok(ExitCode::from(EXIT_NOT_CHECKED))
            }
            Err(e) => {
                eprintln!("switchyard: {e:#}");
                Ok(ExitCode::from(EXIT_NOT_CHECKED))
            }
        },
    }
}
