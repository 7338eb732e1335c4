//! A model of Switchyard's dual-write protocol, for exhaustive checking with
//! [stateright](https://docs.rs/stateright/0.31.0/stateright/).
//!
//! Two keys of one mirrored table, two clients (each through its own proxy) running one-key
//! write transactions, one repair worker, one backfill worker copying one chunk that covers both
//! keys, and the crash and failure points of `docs/dual-writes.md`. [`DualWrite`] chooses which
//! repair runs (today's, which reads OLD `FOR UPDATE` before touching NEW, or the new one, which
//! locks the key on NEW first) and how a mirrored delete is applied on NEW (today's one
//! statement, or with the key lock taken first). `model/README.md` says what is modelled, what
//! is abstracted away and why, and the state counts.
//!
//! The properties (`always`, checked in every reachable state) are the ones of issue 11,
//! section 7; "quiet" means no client operation, repair step or backfill step is pending and
//! no intent is left:
//!
//! 1. [`CONVERGENCE`]: once quiet, OLD and NEW hold the same value (or absence) for every key.
//! 2. [`NO_RESURRECTION`]: once quiet, NEW has no row for a key OLD has deleted; and
//!    [`BACKFILL_FENCED`]: the backfill never commits a row for a key that has a record (or a
//!    row) on NEW.
//! 3. [`NO_LOST_WRITE`]: once quiet, NEW has the value of every acknowledged write that is the
//!    latest on OLD for its key.
//! 4. [`PER_KEY_ORDER`]: NEW applies the images of a key in OLD's commit order (a record's
//!    version, which grows by one per write under the key lock, never goes to an older image).
//!
//! A few `sometimes` properties make sure the interesting situations are reached at all, so
//! that a pass cannot be vacuous.

mod state;
mod steps;

use stateright::{Model, Property};

pub use state::{
    Backfill, Client, ClientStep, ClientTx, Intent, NewPhase, NewTx, Owner, Record, RepairStep, State, Val,
    CLIENTS, FIRST_WID, INITIAL_VALUE, KEYS, MAX_OPS,
};

/// Property name: once quiet, OLD and NEW agree on every key.
pub const CONVERGENCE: &str = "convergence once quiet";
/// Property name: once quiet, NEW has no row for a key OLD has deleted.
pub const NO_RESURRECTION: &str = "no resurrected delete";
/// Property name: the backfill never commits a row over a record or a row on NEW.
pub const BACKFILL_FENCED: &str = "backfill writes only keys without a record";
/// Property name: once quiet, NEW has every acknowledged write that is the latest for its key.
pub const NO_LOST_WRITE: &str = "no lost acknowledged write";
/// Property name: NEW applies each key's images in OLD's commit order.
pub const PER_KEY_ORDER: &str = "per-key order";

/// Which repair of an intent the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RepairVersion {
    /// `store::mirror::repair_intent` today: lock the intent, read its keys from OLD with
    /// `SELECT ... FOR UPDATE` (which locks only the keys OLD has), then on NEW claim the
    /// applied row, upsert the rows read and delete the keys found absent, commit NEW, delete
    /// the intent, commit OLD.
    Today,
    /// The proposed repair: lock the intent, lock each key on NEW first (an upsert of its key
    /// record) and claim the applied row, then read OLD without locks, apply, commit NEW, delete
    /// the intent, commit OLD.
    LockNewFirst,
}

/// How a mirrored delete (a client's or a repair's) is applied on NEW.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeleteApply {
    /// Today (`MirrorTable::apply_statement`): the fence lock shared in a statement of its own,
    /// then one statement that deletes the row and upserts the tombstone. The statement's
    /// snapshot is taken before it waits for the key record's lock, and a `DELETE` neither sees
    /// nor waits for an uncommitted insert.
    OneStatement,
    /// Proposed: first take the key's lock (upsert the record, a statement of its own), then the
    /// fence lock and the delete, whose snapshot then comes after every earlier writer of the
    /// key committed.
    KeyLockFirst,
}

/// The model: its variants and its bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DualWrite {
    /// The repair.
    pub repair: RepairVersion,
    /// The apply of mirrored deletes.
    pub delete: DeleteApply,
    /// Operations per client (1 to [`MAX_OPS`]); a bound of the model.
    pub ops_per_client: u8,
    /// How many failures (client crashes, NEW failures, repair and backfill failures) one run
    /// may have, `None` for no limit; a bound of the model. A backfill chunk rolled back by a
    /// unique violation is not a failure here: the protocol forces it.
    pub max_failures: Option<u8>,
}

/// A step of the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A client begins a write transaction: locks `key` on OLD and writes it (upsert, or
    /// delete of a row OLD has), uncommitted.
    Begin {
        /// The client.
        client: u8,
        /// The key.
        key: u8,
        /// A delete (else an upsert).
        delete: bool,
    },
    /// The client's next statement on NEW (applying its image).
    ClientNew(u8),
    /// NEW fails or times out for the client (before or at its COMMIT).
    ClientNewFails(u8),
    /// The client's intent and OLD's COMMIT.
    ClientCommitOld(u8),
    /// NEW's COMMIT, then the client's acknowledgement.
    ClientCommitNew(u8),
    /// The background deletion of the client's applied intent.
    ClientDeleteIntent(u8),
    /// The client's proxy dies (or OLD's COMMIT fails).
    ClientCrash(u8),
    /// The repair worker locks the intent of write `wid`.
    RepairPick(Val),
    /// The repair's next step.
    RepairStep,
    /// The repair fails or its worker dies.
    RepairFails,
    /// The backfill chunk's next step.
    BackfillStep,
    /// The backfill chunk's transaction fails.
    BackfillFails,
}

impl Action {
    /// Whether the action is the repair worker's.
    pub fn is_repair(&self) -> bool {
        matches!(
            self,
            Action::RepairPick(_) | Action::RepairStep | Action::RepairFails
        )
    }

    /// Whether the action is a failure (counted against [`DualWrite::max_failures`]).
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Action::ClientNewFails(_) | Action::ClientCrash(_) | Action::RepairFails | Action::BackfillFails
        )
    }
}

impl DualWrite {
    /// The model with the given variants and bounds.
    pub fn new(
        repair: RepairVersion,
        delete: DeleteApply,
        ops_per_client: u8,
        max_failures: Option<u8>,
    ) -> DualWrite {
        DualWrite {
            repair,
            delete,
            ops_per_client,
            max_failures,
        }
    }

    /// The model with today's repair and delete.
    pub fn today(ops_per_client: u8, max_failures: Option<u8>) -> DualWrite {
        DualWrite::new(
            RepairVersion::Today,
            DeleteApply::OneStatement,
            ops_per_client,
            max_failures,
        )
    }

    /// The model with the new repair and key-lock-first deletes.
    pub fn proposed(ops_per_client: u8, max_failures: Option<u8>) -> DualWrite {
        DualWrite::new(
            RepairVersion::LockNewFirst,
            DeleteApply::KeyLockFirst,
            ops_per_client,
            max_failures,
        )
    }

    /// Whether nothing is pending: no client transaction is in flight (a client may still
    /// begin another operation later), no intent is left, the repair worker is idle and the
    /// backfill chunk committed.
    pub fn quiet(&self, s: &State) -> bool {
        s.clients.iter().all(|c| c.tx.is_none())
            && s.intents.iter().all(Option::is_none)
            && s.repair == RepairStep::Idle
            && s.backfill == Backfill::Done
    }
}

impl Model for DualWrite {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let client = Client {
            ops_done: 0,
            tx: None,
        };
        vec![State {
            old: [Some(INITIAL_VALUE), None],
            old_pos: [0; KEYS],
            old_lock: [None; KEYS],
            intents: [None; CLIENTS * MAX_OPS],
            new_row: [None; KEYS],
            new_rec: [None; KEYS],
            new_lock: [None; KEYS],
            fence_shared: 0,
            chunk_rows: [None; KEYS],
            clients: [client; CLIENTS],
            repair: RepairStep::Idle,
            backfill: Backfill::Start,
            acked: 0,
            failures: 0,
            order_violated: false,
            backfill_overwrote: false,
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        steps::candidate_actions(self, state, actions);
    }

    fn next_state(&self, last_state: &State, action: Action) -> Option<State> {
        self.step(last_state, action)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(CONVERGENCE, |m: &DualWrite, s: &State| {
                !m.quiet(s) || s.old == s.new_row
            }),
            Property::always(NO_RESURRECTION, |m: &DualWrite, s: &State| {
                !m.quiet(s) || (0..KEYS).all(|k| s.old[k].is_some() || s.new_row[k].is_none())
            }),
            Property::always(BACKFILL_FENCED, |_, s: &State| !s.backfill_overwrote),
            Property::always(NO_LOST_WRITE, |m: &DualWrite, s: &State| {
                !m.quiet(s)
                    || (0..KEYS).all(|k| match s.old[k] {
                        Some(v) if s.is_acked(v) => s.new_row[k] == Some(v),
                        _ => true,
                    })
            }),
            Property::always(PER_KEY_ORDER, |_, s: &State| !s.order_violated),
            // Reachability, so that a pass is not vacuous.
            Property::sometimes(
                "quiet with both keys written through the proxies",
                |m: &DualWrite, s: &State| m.quiet(s) && s.old_pos.iter().all(|&p| p > 0),
            ),
            Property::sometimes(
                "repair applies a delete on NEW",
                |_, s: &State| matches!(s.repair, RepairStep::Applying { tx, .. } if tx.image.is_none() && tx.staged()),
            ),
            Property::sometimes(
                "repair applies an upsert on NEW",
                |_, s: &State| matches!(s.repair, RepairStep::Applying { tx, .. } if tx.image.is_some() && tx.staged()),
            ),
            Property::sometimes("chunk holds a copied row of a tombstoned key", |_, s: &State| {
                (0..KEYS).any(|k| s.chunk_rows[k].is_some() && s.new_rec[k].is_some_and(|r| r.deleted))
            }),
            Property::sometimes("client's NEW apply waits for the chunk", |_, s: &State| {
                s.clients.iter().filter_map(|c| c.tx).any(|t| {
                    matches!(t.step, ClientStep::Apply(tx) if tx.image.is_some() && tx.phase == NewPhase::Start)
                        && s.chunk_rows[usize::from(t.key)].is_some()
                })
            }),
        ]
    }
}
