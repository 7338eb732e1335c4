//! Exhaustive checks of the dual-write model (see model/README.md): today's repair has the
//! known race, today's one-statement delete has a race of its own, and the proposed protocol
//! (the key-lock-first repair and delete) satisfies every property for the model's bounds.

use std::collections::BTreeSet;
use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model, Path};
use switchyard_model::{
    Action, DeleteApply, DualWrite, RepairVersion, State, BACKFILL_FENCED, CONVERGENCE, NO_LOST_WRITE,
    NO_RESURRECTION, PER_KEY_ORDER,
};

/// Runs a full breadth-first check on one thread, or stops at the first discovery of one of
/// `stop_at`, and prints the counts.
fn check(model: DualWrite, stop_at: &[&'static str]) -> impl Checker<DualWrite> {
    let started = Instant::now();
    let mut builder = model.checker();
    if !stop_at.is_empty() {
        builder = builder.finish_when(HasDiscoveries::AnyOf(
            stop_at.iter().copied().collect::<BTreeSet<_>>(),
        ));
    }
    let checker = builder.spawn_bfs().join();
    eprintln!(
        "{model:?}: {} states, {} unique, depth {}, {:.1?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    checker
}

/// The shortest path to a violation of `property` (the search stops there), printed.
fn counterexample(model: DualWrite, property: &'static str) -> Option<Path<State, Action>> {
    let path = check(model, &[property]).discovery(property)?;
    eprintln!("counterexample for \"{property}\":\n{}", describe(&path));
    Some(path)
}

/// One line per step: the action, then OLD, NEW's rows and records, and the intents.
fn describe(path: &Path<State, Action>) -> String {
    let mut out = String::new();
    for (state, action) in path
        .clone()
        .into_vec()
        .into_iter()
        .skip(1)
        .zip(path.clone().into_actions())
    {
        let (s, _) = state;
        out.push_str(&format!(
            "{action:?}\n    old {:?} | new rows {:?} | records {:?} | intents {:?} | repair {:?}\n",
            s.old,
            s.new_row,
            s.new_rec
                .map(|r| r.map(|r| if r.deleted { "tombstone" } else { "live" })),
            s.intents.iter().flatten().collect::<Vec<_>>(),
            s.repair,
        ));
    }
    out
}

#[test]
fn todays_repair_deletes_a_row_reinserted_while_it_ran() {
    // Deletes take the key lock first here, so that the only race left is the repair's.
    let model = DualWrite::new(RepairVersion::Today, DeleteApply::KeyLockFirst, 2, Some(1));
    let path = counterexample(model, NO_LOST_WRITE).expect("today's repair must lose a write");
    let actions = path.clone().into_actions();
    let last = path.last_state();
    assert!(model.quiet(last));
    let lost = (0..2).find(|&k| last.old[k].is_some() && last.new_row[k].is_none());
    assert!(lost.is_some(), "OLD has a row NEW lacks: {last:?}");
    // The race: a mirrored delete fails on NEW (leaving its intent), the repair reads the key
    // absent, a client re-inserts it, and the repair then deletes it on NEW.
    assert!(actions.contains(&Action::ClientNewFails(0)) || actions.contains(&Action::ClientNewFails(1)));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Begin { delete: true, .. })));
    // The repair read OLD (its first step after picking the intent) before the re-insert
    // committed there, and wrote NEW after.
    let read = actions.iter().position(|a| *a == Action::RepairStep);
    let reinsert = actions
        .iter()
        .rposition(|a| matches!(a, Action::ClientCommitOld(_)));
    let repair_last = actions.iter().rposition(Action::is_repair);
    assert!(
        matches!((read, reinsert, repair_last), (Some(r), Some(i), Some(w)) if r < i && i < w),
        "the repair spans the re-insert: {actions:?}"
    );
    // The same counterexample breaks convergence and the per-key order.
    for property in [CONVERGENCE, PER_KEY_ORDER] {
        let p = model.property(property);
        assert!(!(p.condition)(&model, last), "{property} holds in the last state");
    }
}

#[test]
fn todays_code_fails_convergence() {
    let path = counterexample(DualWrite::today(1, Some(1)), CONVERGENCE).expect("today's code must diverge");
    assert!(DualWrite::today(1, Some(1)).quiet(path.last_state()));
}

#[test]
fn a_one_statement_delete_leaves_a_row_inserted_under_it() {
    // The new repair, today's delete, and no failure at all.
    let model = DualWrite::new(RepairVersion::LockNewFirst, DeleteApply::OneStatement, 1, Some(0));
    let path = counterexample(model, NO_RESURRECTION).expect("the delete race must be found");
    let actions = path.clone().into_actions();
    assert!(
        !actions.iter().any(|a| a.is_repair() || a.is_failure()),
        "{actions:?}"
    );
    let last = path.last_state();
    let k = (0..2).find(|&k| last.old[k].is_none() && last.new_row[k].is_some());
    let k = k.expect("a row on NEW for a key OLD deleted");
    assert!(
        last.new_rec[k].is_some_and(|r| r.deleted),
        "the row sits under a tombstone"
    );
}

/// The proposed protocol, full BFS, every property; `floor` keeps the pass from being vacuous.
fn proposed_holds(model: DualWrite, floor: usize) {
    let checker = check(model, &[]);
    checker.assert_properties();
    for property in [
        CONVERGENCE,
        NO_RESURRECTION,
        BACKFILL_FENCED,
        NO_LOST_WRITE,
        PER_KEY_ORDER,
    ] {
        checker.assert_no_discovery(property);
    }
    assert!(checker.is_done());
    assert!(
        checker.unique_state_count() > floor,
        "only {} unique states",
        checker.unique_state_count()
    );
}

#[test]
fn proposed_protocol_holds_for_two_operations_per_client_and_one_failure() {
    proposed_holds(DualWrite::proposed(2, Some(1)), 3_000_000);
}

#[test]
fn proposed_protocol_holds_for_one_operation_per_client_and_any_failures() {
    proposed_holds(DualWrite::proposed(1, None), 50_000);
}
