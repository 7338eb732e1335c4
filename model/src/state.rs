//! The state of the modelled system: OLD, NEW, the clients' transactions, the repair worker and
//! the backfill worker. Everything is small and `Copy`, so that stateright can hash and clone
//! states cheaply.

/// Number of keys of the (one) mirrored table.
pub const KEYS: usize = 2;
/// Number of clients, each writing through its own proxy.
pub const CLIENTS: usize = 2;
/// The most operations a client may be configured to run.
pub const MAX_OPS: usize = 3;
/// Write ids of client operations start here; `1` is the value OLD had before dual writes began.
pub const FIRST_WID: u8 = 2;
/// The value of key 0 on OLD before dual writes began (key 1 starts absent).
pub const INITIAL_VALUE: Val = 1;

/// A row's value. Every write of the model writes a value of its own (its write id), so a value
/// on NEW tells which OLD write it came from.
pub type Val = u8;

/// Who holds a lock or runs a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A client's transaction (through its proxy).
    Client(u8),
    /// The repair worker.
    Repair,
}

impl Owner {
    /// The bit of this owner in [`State::fence_shared`].
    pub fn bit(self) -> u8 {
        match self {
            Owner::Client(c) => 1 << c,
            Owner::Repair => 1 << CLIENTS,
        }
    }
}

/// A key's record in NEW's `switchyard_keys_*` table (committed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Record {
    /// A tombstone.
    pub deleted: bool,
    /// The position, in OLD's commit order for the key, of the state whose image the record's
    /// last writer applied. The real record holds a version that grows by one per write under
    /// the key lock, so versions order NEW's commits per key; invariant 4 says that order is
    /// OLD's, i.e. `pos` never goes down.
    pub pos: u8,
}

/// An intent record on OLD (committed), for a one-key transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Intent {
    /// The key the transaction wrote.
    pub key: u8,
    /// NEW has (committed) the `switchyard_applied` row naming this intent.
    pub applied: bool,
}

/// How far a transaction on NEW applying one image has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NewPhase {
    /// Nothing sent yet.
    Start,
    /// A delete applied key-lock-first holds the key lock; the fence lock and the delete follow.
    KeyLocked,
    /// A delete applied as one statement holds the fence lock shared and its statement has
    /// taken its snapshot (`saw_row`: a committed row was visible); it waits for the key lock.
    Statement { saw_row: bool },
    /// The image is applied, uncommitted, under the key lock. For a delete, `saw_row` says
    /// whether the delete removes the row (it removes only a row its snapshot saw).
    Staged { saw_row: bool },
}

/// A transaction on NEW applying one image (an upsert or a delete) to one key, with the key's
/// record bump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NewTx {
    /// The key.
    pub key: u8,
    /// `Some(value)`: upsert; `None`: delete (tombstone).
    pub image: Option<Val>,
    /// Progress.
    pub phase: NewPhase,
}

impl NewTx {
    /// Whether the image is applied (uncommitted) and the transaction can commit.
    pub fn staged(&self) -> bool {
        matches!(self.phase, NewPhase::Staged { .. })
    }

    /// Whether the staged image inserted, updated or deleted the key's row (a delete whose
    /// snapshot saw no row leaves the row alone and only writes the tombstone).
    pub fn touches_row(&self) -> bool {
        match self.phase {
            NewPhase::Staged { saw_row } => self.image.is_some() || saw_row,
            _ => false,
        }
    }
}

/// Where a client's write transaction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientStep {
    /// OLD holds the key's lock and the uncommitted write; NEW applies the image.
    Apply(NewTx),
    /// NEW's round trip is over (`Some`: applied, uncommitted; `None`: failed, rolled back);
    /// next: the intent and OLD's COMMIT.
    CommitOld(Option<NewTx>),
    /// OLD committed (at position `pos` of the key's commit order); next: NEW's COMMIT.
    CommitNew { tx: NewTx, pos: u8 },
    /// Acknowledged; the intent is deleted later.
    DeleteIntent,
}

/// A client's transaction in flight: one write of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientTx {
    /// The write's id (also its value, and its intent's id).
    pub wid: Val,
    /// The key.
    pub key: u8,
    /// `Some(wid)`: upsert; `None`: delete.
    pub write: Option<Val>,
    /// Progress.
    pub step: ClientStep,
}

/// A client (with its proxy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Client {
    /// Operations finished (committed, rolled back, or abandoned by a crash).
    pub ops_done: u8,
    /// The operation in flight.
    pub tx: Option<ClientTx>,
}

/// Where the repair worker is. Every step but `Idle` holds the intent's row lock on OLD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RepairStep {
    /// Looking for an intent.
    Idle,
    /// The intent `wid` is locked (`FOR UPDATE SKIP LOCKED`).
    IntentLocked { wid: Val },
    /// Today's repair: OLD read `FOR UPDATE` (`image`, at position `pos`); next: claim the
    /// applied row on NEW.
    Read { wid: Val, image: Option<Val>, pos: u8 },
    /// The new repair: NEW's key lock is held and the applied row claimed; next: read OLD.
    KeyLocked { wid: Val },
    /// Applying OLD's state (read at position `pos`) on NEW.
    Applying { wid: Val, tx: NewTx, pos: u8 },
    /// NEW committed (or already had the transaction); next: delete the intent, commit OLD.
    NewCommitted { wid: Val },
}

/// Where the backfill worker is with the (one) chunk, which covers both keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backfill {
    /// Next: lease the chunk and read which keys have records on NEW.
    Start,
    /// Keys with a record (left out of the copy); next: OLD's snapshot.
    Recorded { taken: [bool; KEYS] },
    /// OLD's snapshot of the keys to copy; next: COPY key `next` into NEW's table (`next ==
    /// KEYS`: take the fence lock, sweep, commit).
    Copying { snap: [Option<Val>; KEYS], next: u8 },
    /// The chunk committed.
    Done,
}

/// The whole system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// OLD's committed rows.
    pub old: [Option<Val>; KEYS],
    /// Per key, how many commits on OLD wrote it.
    pub old_pos: [u8; KEYS],
    /// OLD's row lock (or, for an insert, its uncommitted unique-index entry) per key.
    pub old_lock: [Option<Owner>; KEYS],
    /// OLD's intents, indexed by `wid - FIRST_WID`.
    pub intents: [Option<Intent>; CLIENTS * MAX_OPS],
    /// NEW's committed rows.
    pub new_row: [Option<Val>; KEYS],
    /// NEW's committed key records.
    pub new_rec: [Option<Record>; KEYS],
    /// NEW's key lock of mirrored writers (the row's and the record's lock, taken together).
    pub new_lock: [Option<Owner>; KEYS],
    /// Holders of the fence lock shared (bits of [`Owner::bit`]).
    pub fence_shared: u8,
    /// The backfill chunk's uncommitted copied rows.
    pub chunk_rows: [Option<Val>; KEYS],
    /// The clients.
    pub clients: [Client; CLIENTS],
    /// The repair worker.
    pub repair: RepairStep,
    /// The backfill worker.
    pub backfill: Backfill,
    /// Acknowledged writes (bit `wid`).
    pub acked: u16,
    /// Failures so far, counted only when [`crate::DualWrite::max_failures`] bounds them.
    pub failures: u8,
    /// History: a NEW commit applied, for some key, an image older (in OLD's commit order)
    /// than the one NEW's record already had.
    pub order_violated: bool,
    /// History: the backfill committed a row for a key that had a record or a row on NEW.
    pub backfill_overwrote: bool,
}

impl State {
    /// The intent `wid`, if it exists.
    pub fn intent(&self, wid: Val) -> Option<Intent> {
        self.intents
            .get(usize::from(wid.wrapping_sub(FIRST_WID)))
            .copied()
            .flatten()
    }

    /// Sets or clears the intent `wid`.
    pub fn set_intent(&mut self, wid: Val, intent: Option<Intent>) {
        if let Some(slot) = self.intents.get_mut(usize::from(wid.wrapping_sub(FIRST_WID))) {
            *slot = intent;
        }
    }

    /// Whether `wid` was acknowledged to its client.
    pub fn is_acked(&self, wid: Val) -> bool {
        self.acked & (1 << wid) != 0
    }

    /// The mirrored transaction that has applied an image to `key` on NEW and not yet
    /// committed, if any (it holds the key lock).
    pub fn staged_on(&self, key: usize) -> Option<NewTx> {
        let client = self
            .clients
            .iter()
            .filter_map(|c| c.tx)
            .filter_map(|t| match t.step {
                ClientStep::Apply(tx)
                | ClientStep::CommitOld(Some(tx))
                | ClientStep::CommitNew { tx, .. } => Some(tx),
                _ => None,
            });
        let repair = match self.repair {
            RepairStep::Applying { tx, .. } => Some(tx),
            _ => None,
        };
        client
            .chain(repair)
            .find(|tx| tx.staged() && usize::from(tx.key) == key)
    }
}
