use stateright::{Checker, Model};
use std::time::Instant;
use switchyard_model::*;

fn run(m: DualWrite) {
    let t = Instant::now();
    let c = m.checker().spawn_bfs().join();
    eprintln!(
        "{m:?}: {} states ({} unique), depth {}, {:?}",
        c.state_count(),
        c.unique_state_count(),
        c.max_depth(),
        t.elapsed()
    );
    let mut names: Vec<_> = c.discoveries().into_iter().collect();
    names.sort_by_key(|(n, _)| *n);
    for (n, p) in names {
        eprintln!("  {n}: {} steps", p.clone().into_actions().len());
    }
}

#[test]
#[ignore]
fn explore() {
    let ops: u8 = std::env::var("OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let fails: Option<u8> = std::env::var("FAILS").ok().and_then(|s| s.parse().ok());
    for repair in [RepairVersion::Today, RepairVersion::LockNewFirst] {
        for delete in [DeleteApply::OneStatement, DeleteApply::KeyLockFirst] {
            run(DualWrite::new(repair, delete, ops, fails));
        }
    }
}

/// The proposed protocol at a larger bound (`OPS`, `FAILS`; unset `FAILS` = no limit), for
/// runs by hand: `OPS=2 FAILS=2 cargo test -p switchyard-model --test explore -- --ignored larger`.
#[test]
#[ignore]
fn larger() {
    let ops: u8 = std::env::var("OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let fails: Option<u8> = std::env::var("FAILS").ok().and_then(|s| s.parse().ok());
    let m = DualWrite::proposed(ops, fails);
    let c = m.checker().spawn_bfs().join();
    eprintln!(
        "{m:?}: {} states ({} unique)",
        c.state_count(),
        c.unique_state_count()
    );
    c.assert_properties();
}
