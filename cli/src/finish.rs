//! The steps around cutover that are not phase changes: `switchyard sequences` (the other
//! store's sequences set past the authoritative one's, before it takes writes) and `switchyard
//! cleanup` (Switchyard's objects removed from both stores once every table is `done`).

use std::path::Path;
use std::process::ExitCode;

use clap::ValueEnum;
use switchyard_config::Config;
use switchyard_store::cleanup::{has_side_schema, remove_side_objects, CleanupError, CleanupReport};
use switchyard_store::sequences::{advance_sequences, SequenceError};
use switchyard_store::{Role, Store};

use crate::{current_thread_runtime, load_for_check, EXIT_NOT_CHECKED};

/// A store named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Side {
    Old,
    New,
}

impl From<Side> for Role {
    fn from(side: Side) -> Role {
        match side {
            Side::Old => Role::Old,
            Side::New => Role::New,
        }
    }
}

async fn stores(config: &Config) -> Result<(Store, Store), switchyard_store::StoreError> {
    let old = Store::connect_lazy(Role::Old, &config.old.url)?;
    let new = Store::connect_lazy(Role::New, &config.new.url)?;
    old.ping(config.proxy.connect_timeout).await?;
    new.ping(config.proxy.connect_timeout).await?;
    Ok((old, new))
}

/// `switchyard sequences`: exit 0 when every sequence is past the source's, 1 when one could not
/// be (missing on the target, beyond its bound), 2 when it could not be tried.
pub(crate) fn sequences(
    file: &Path,
    from: Option<Side>,
    margin: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let Some(config) = load_for_check(file) else {
        return Ok(ExitCode::from(EXIT_NOT_CHECKED));
    };
    let runtime = current_thread_runtime()?;
    let result = runtime.block_on(async {
        let (old, new) = stores(&config).await?;
        // Each table's source: the store that takes its writes per the control state (OLD
        // before it exists); with table groups split between the stores, some are OLD's and
        // some NEW's, and each set moves its own way.
        let state = match from {
            Some(_) => None,
            None => switchyard_control::locate(&old, &new)
                .await?
                .map(|(_, state)| state),
        };
        let mut runs: Vec<(Role, Vec<_>)> = Vec::new();
        for t in &config.tables {
            let source = match (from, &state) {
                (Some(side), _) => Role::from(side),
                (None, Some(state)) => switchyard_control::authority_of(state, &t.name.to_string()),
                (None, None) => Role::Old,
            };
            match runs.iter_mut().find(|(r, _)| *r == source) {
                Some((_, tables)) => tables.push(t.name.clone()),
                None => runs.push((source, vec![t.name.clone()])),
            }
        }
        if runs.is_empty() {
            runs.push((from.map_or(Role::Old, Role::from), Vec::new()));
        }
        let mut done = Vec::new();
        for (source, tables) in runs {
            let (source, target) = match source {
                Role::Old => (&old, &new),
                Role::New => (&new, &old),
            };
            let moves = advance_sequences(source, target, &tables, margin).await?;
            done.push((source.role(), target.role(), moves));
        }
        Ok::<_, SequenceError>(done)
    });
    let runs = match result {
        Ok(done) => done,
        Err(SequenceError::Store(e)) => {
            eprintln!("switchyard sequences: {e}");
            return Ok(ExitCode::from(EXIT_NOT_CHECKED));
        }
        Err(e) => {
            eprintln!("switchyard sequences: {e}");
            if json {
                let v = serde_json::json!({"status": "failed", "error": e.to_string()});
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    if json {
        let run = |(source, target, moves): &(Role, Role, Vec<_>)| serde_json::json!({"from": source.as_str(), "to": target.as_str(), "sequences": moves});
        // One direction: its report as the top-level object. Two (table groups split): both
        // under `runs`.
        let v = match runs.as_slice() {
            [one] => {
                let mut v = run(one);
                v["margin"] = margin.into();
                v
            }
            _ => serde_json::json!({
                "margin": margin,
                "runs": runs.iter().map(run).collect::<Vec<_>>(),
            }),
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (source, target, moves) in &runs {
        for m in moves {
            let change = if m.moved {
                format!("{} -> {}", m.target_before, m.target_after)
            } else {
                format!("stays at {} (already past)", m.target_before)
            };
            println!(
                "{} ({}): {} at {}{}, {} {change}",
                m.sequence,
                m.tables.join(", "),
                source.name(),
                m.source_value,
                if m.source_called { "" } else { " (not yet called)" },
                target.name(),
            );
        }
        println!(
            "{} sequences of the configured tables {}on {} are past {}'s (margin {margin} increments)",
            moves.len(),
            if runs.len() > 1 {
                format!("whose writes {} takes ", source.name())
            } else {
                String::new()
            },
            target.name(),
            source.name()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `switchyard cleanup`: exit 0 when both stores are clean (or were), 1 when refused (a table
/// not done, objects depending on Switchyard's), 2 when it could not be tried.
pub(crate) fn cleanup(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let Some(config) = load_for_check(file) else {
        return Ok(ExitCode::from(EXIT_NOT_CHECKED));
    };
    let runtime = current_thread_runtime()?;
    let result = runtime.block_on(async {
        let (old, new) = stores(&config).await?;
        let (home, state) = match switchyard_control::locate(&old, &new).await? {
            Some(found) => found,
            None => {
                if has_side_schema(&old).await? || has_side_schema(&new).await? {
                    return Ok(Err(vec![
                        "no control state on either store, so it cannot tell that every table is done; \
                         run `switchyard prepare` to seed it, and move the tables to done"
                            .to_owned(),
                    ]));
                }
                // Nothing was ever created, or an earlier cleanup removed it all.
                return Ok(Ok(Vec::new()));
            }
        };
        let reasons = switchyard_control::not_done(&config, &state);
        if !reasons.is_empty() {
            return Ok(Err(reasons));
        }
        // The store holding the control state last: should the first fail, running again
        // still finds the state that says every table is done.
        let order = match home {
            Role::Old => [&new, &old],
            Role::New => [&old, &new],
        };
        // A dry run on both first: a refusal on either leaves both as they were.
        let mut refusals = Vec::new();
        for store in order {
            match remove_side_objects(store, false).await {
                Ok(_) => {}
                Err(e @ CleanupError::Dependents { .. }) => refusals.push(e.to_string()),
                Err(CleanupError::Store(e)) => return Err(e),
            }
        }
        if !refusals.is_empty() {
            return Ok(Err(refusals));
        }
        let mut reports = Vec::new();
        for store in order {
            match remove_side_objects(store, true).await {
                Ok(r) => reports.push(r),
                // Created between the dry run and now.
                Err(e @ CleanupError::Dependents { .. }) => {
                    let done: Vec<&str> = reports.iter().map(|r: &CleanupReport| r.store).collect();
                    return Ok(Err(vec![format!(
                        "{e}; the stores cleaned before it ({}) stay cleaned: run again once it is resolved",
                        done.join(", ")
                    )]));
                }
                Err(CleanupError::Store(e)) => return Err(e),
            }
        }
        Ok::<_, switchyard_store::StoreError>(Ok(reports))
    });
    match result {
        Err(e) => {
            eprintln!("switchyard cleanup: {e}");
            Ok(ExitCode::from(EXIT_NOT_CHECKED))
        }
        Ok(Err(reasons)) => {
            if json {
                let v = serde_json::json!({"refused": reasons});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("cleanup refused (nothing was removed):");
                for r in &reasons {
                    println!("  - {r}");
                }
            }
            Ok(ExitCode::FAILURE)
        }
        Ok(Ok(reports)) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"stores": reports}))?
                );
            } else {
                print_cleanup(&reports);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_cleanup(reports: &[CleanupReport]) {
    if reports.iter().all(|r| !r.found) {
        println!(
            "nothing to clean: neither store has a {} schema",
            switchyard_store::SIDE_SCHEMA
        );
        return;
    }
    for r in reports {
        if !r.found {
            println!("{}: nothing to clean", r.store);
            continue;
        }
        println!(
            "{}: removed schema {} ({} tables, {} other objects) and {} triggers",
            r.store,
            switchyard_store::SIDE_SCHEMA,
            r.tables.len(),
            r.other_objects,
            r.triggers.len()
        );
        for t in &r.triggers {
            println!("  trigger {t}");
        }
    }
}
