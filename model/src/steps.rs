//! The transitions: what each action does to a [`State`], or `None` when it cannot happen (a
//! lock it needs is held, or there is nothing to do).

use crate::state::{
    Backfill, Client, ClientStep, ClientTx, Intent, NewPhase, NewTx, Owner, Record, RepairStep, State, Val,
    CLIENTS, FIRST_WID, KEYS,
};
use crate::{Action, DeleteApply, DualWrite, RepairVersion};

impl DualWrite {
    /// The state after `action`, or `None` if it is not enabled in `s`.
    pub(crate) fn step(&self, s: &State, action: Action) -> Option<State> {
        let mut n = *s;
        if let (true, Some(most)) = (action.is_failure(), self.max_failures) {
            if s.failures >= most {
                return None;
            }
            n.failures += 1;
        }
        let done = match action {
            Action::Begin { client, key, delete } => self.begin(&mut n, client, key, delete),
            Action::ClientNew(c) => self.client_new(&mut n, c),
            Action::ClientNewFails(c) => client_new_fails(&mut n, c),
            Action::ClientCommitOld(c) => client_commit_old(&mut n, c),
            Action::ClientCommitNew(c) => client_commit_new(&mut n, c),
            Action::ClientDeleteIntent(c) => client_delete_intent(&mut n, c),
            Action::ClientCrash(c) => client_crash(&mut n, c),
            Action::RepairPick(wid) => repair_pick(&mut n, wid),
            Action::RepairStep => self.repair_step(&mut n),
            Action::RepairFails => repair_fails(&mut n),
            Action::BackfillStep => backfill_step(&mut n),
            Action::BackfillFails => backfill_fails(&mut n),
        };
        done.then_some(n)
    }

    /// A client begins its next operation: locks the key on OLD and writes it (uncommitted).
    /// A delete needs a committed row (a delete of an absent key changes nothing and mirrors
    /// nothing); both wait while another transaction holds the key.
    fn begin(&self, s: &mut State, c: u8, key: u8, delete: bool) -> bool {
        let k = usize::from(key);
        let Some(client) = s.clients.get(usize::from(c)).copied() else {
            return false;
        };
        if client.tx.is_some() || usize::from(client.ops_done) >= usize::from(self.ops_per_client) {
            return false;
        }
        if s.old_lock[k].is_some() || (delete && s.old[k].is_none()) {
            return false;
        }
        let wid = FIRST_WID + c * self.ops_per_client + client.ops_done;
        let write = (!delete).then_some(wid);
        s.old_lock[k] = Some(Owner::Client(c));
        s.clients[usize::from(c)].tx = Some(ClientTx {
            wid,
            key,
            write,
            step: ClientStep::Apply(NewTx {
                key,
                image: write,
                phase: NewPhase::Start,
            }),
        });
        true
    }

    /// One statement of a client's NEW round trip; once the image is applied, the round trip is
    /// over and OLD's commit comes next.
    fn client_new(&self, s: &mut State, c: u8) -> bool {
        let Some(mut t) = client_tx(s, c) else {
            return false;
        };
        let ClientStep::Apply(tx) = t.step else {
            return false;
        };
        let Some(tx) = self.advance(s, Owner::Client(c), tx) else {
            return false;
        };
        t.step = if tx.staged() {
            ClientStep::CommitOld(Some(tx))
        } else {
            ClientStep::Apply(tx)
        };
        s.clients[usize::from(c)].tx = Some(t);
        true
    }

    /// One step of a transaction applying an image on NEW, if its locks are free.
    fn advance(&self, s: &mut State, owner: Owner, tx: NewTx) -> Option<NewTx> {
        let k = usize::from(tx.key);
        let lock_free = s.new_lock[k].is_none_or(|o| o == owner);
        let phase = match (tx.image, tx.phase) {
            // INSERT ... ON CONFLICT DO UPDATE waits for the chunk's uncommitted row too.
            (Some(_), NewPhase::Start) => {
                if !lock_free || s.chunk_rows[k].is_some() {
                    return None;
                }
                s.new_lock[k] = Some(owner);
                NewPhase::Staged { saw_row: true }
            }
            (None, NewPhase::Start) => match self.delete {
                // The fence lock (a statement of its own), then the delete statement, whose
                // snapshot sees only committed rows and which waits for no uncommitted insert.
                // (The fence lock is never seen held exclusive: the chunk takes, uses and
                // releases it in one step of the model, after waiting for the shared holders.)
                DeleteApply::OneStatement => {
                    s.fence_shared |= owner.bit();
                    NewPhase::Statement {
                        saw_row: s.new_row[k].is_some(),
                    }
                }
                DeleteApply::KeyLockFirst => {
                    if !lock_free {
                        return None;
                    }
                    s.new_lock[k] = Some(owner);
                    NewPhase::KeyLocked
                }
            },
            (None, NewPhase::Statement { saw_row }) => {
                if !lock_free {
                    return None;
                }
                s.new_lock[k] = Some(owner);
                NewPhase::Staged { saw_row }
            }
            (None, NewPhase::KeyLocked) => {
                s.fence_shared |= owner.bit();
                NewPhase::Staged {
                    saw_row: s.new_row[k].is_some(),
                }
            }
            _ => return None,
        };
        Some(NewTx { phase, ..tx })
    }

    fn repair_step(&self, s: &mut State) -> bool {
        match self.repair {
            RepairVersion::Today => repair_step_today(s),
            RepairVersion::LockNewFirst => repair_step_new(s),
        }
        .unwrap_or_else(|| self.repair_apply(s))
    }

    /// The steps both repairs share: apply on NEW, commit NEW, delete the intent and commit OLD.
    fn repair_apply(&self, s: &mut State) -> bool {
        match s.repair {
            RepairStep::Applying { wid, tx, pos } if tx.staged() => {
                commit_new(s, Owner::Repair, tx, pos);
                if let Some(i) = s.intent(wid) {
                    s.set_intent(wid, Some(Intent { applied: true, ..i }));
                }
                s.repair = RepairStep::NewCommitted { wid };
                true
            }
            RepairStep::Applying { wid, tx, pos } => match self.advance(s, Owner::Repair, tx) {
                Some(tx) => {
                    s.repair = RepairStep::Applying { wid, tx, pos };
                    true
                }
                None => false,
            },
            RepairStep::NewCommitted { wid } => {
                s.set_intent(wid, None);
                release_old(s, Owner::Repair);
                s.repair = RepairStep::Idle;
                true
            }
            _ => false,
        }
    }
}

fn client_tx(s: &State, c: u8) -> Option<ClientTx> {
    s.clients.get(usize::from(c)).and_then(|cl| cl.tx)
}

fn finish_op(s: &mut State, c: u8) {
    let cl: &mut Client = &mut s.clients[usize::from(c)];
    cl.tx = None;
    cl.ops_done += 1;
}

/// Releases every lock `owner` holds on NEW (its transaction there ended).
fn release_new(s: &mut State, owner: Owner) {
    for l in s.new_lock.iter_mut().filter(|l| **l == Some(owner)) {
        *l = None;
    }
    s.fence_shared &= !owner.bit();
}

/// Releases every row lock `owner` holds on OLD (its transaction there ended).
fn release_old(s: &mut State, owner: Owner) {
    for l in s.old_lock.iter_mut().filter(|l| **l == Some(owner)) {
        *l = None;
    }
}

/// NEW's COMMIT of a staged image read from OLD's state at position `pos`.
fn commit_new(s: &mut State, owner: Owner, tx: NewTx, pos: u8) {
    let k = usize::from(tx.key);
    if s.new_rec[k].is_some_and(|r| pos < r.pos) {
        s.order_violated = true;
    }
    match (tx.image, tx.phase) {
        (Some(v), _) => {
            s.new_row[k] = Some(v);
            s.new_rec[k] = Some(Record { deleted: false, pos });
        }
        (None, NewPhase::Staged { saw_row }) => {
            if saw_row {
                s.new_row[k] = None;
            }
            s.new_rec[k] = Some(Record { deleted: true, pos });
        }
        (None, _) => {}
    }
    release_new(s, owner);
}

/// NEW fails or times out for a client: its NEW transaction rolls back. Before OLD's commit the
/// client goes on to commit OLD (with the intent); after it, the client is acknowledged anyway.
fn client_new_fails(s: &mut State, c: u8) -> bool {
    let Some(mut t) = client_tx(s, c) else {
        return false;
    };
    match t.step {
        ClientStep::Apply(_) | ClientStep::CommitOld(Some(_)) => {
            release_new(s, Owner::Client(c));
            t.step = ClientStep::CommitOld(None);
            s.clients[usize::from(c)].tx = Some(t);
        }
        ClientStep::CommitNew { .. } => {
            release_new(s, Owner::Client(c));
            s.acked |= 1 << t.wid;
            finish_op(s, c);
        }
        _ => return false,
    }
    true
}

/// The intent and OLD's COMMIT (the OLD lock goes).
fn client_commit_old(s: &mut State, c: u8) -> bool {
    let Some(mut t) = client_tx(s, c) else {
        return false;
    };
    let ClientStep::CommitOld(new) = t.step else {
        return false;
    };
    let k = usize::from(t.key);
    s.old[k] = t.write;
    s.old_pos[k] += 1;
    s.set_intent(
        t.wid,
        Some(Intent {
            key: t.key,
            applied: false,
        }),
    );
    release_old(s, Owner::Client(c));
    match new {
        Some(tx) => {
            t.step = ClientStep::CommitNew {
                tx,
                pos: s.old_pos[k],
            };
            s.clients[usize::from(c)].tx = Some(t);
        }
        None => {
            s.acked |= 1 << t.wid;
            finish_op(s, c);
        }
    }
    true
}

/// NEW's COMMIT (with the applied row), then the acknowledgement.
fn client_commit_new(s: &mut State, c: u8) -> bool {
    let Some(mut t) = client_tx(s, c) else {
        return false;
    };
    let ClientStep::CommitNew { tx, pos } = t.step else {
        return false;
    };
    commit_new(s, Owner::Client(c), tx, pos);
    if let Some(i) = s.intent(t.wid) {
        s.set_intent(t.wid, Some(Intent { applied: true, ..i }));
    }
    s.acked |= 1 << t.wid;
    t.step = ClientStep::DeleteIntent;
    s.clients[usize::from(c)].tx = Some(t);
    true
}

/// The background deletion of an applied intent; waits while the repair holds the intent.
fn client_delete_intent(s: &mut State, c: u8) -> bool {
    let Some(t) = client_tx(s, c) else {
        return false;
    };
    if t.step != ClientStep::DeleteIntent || repair_holds(s, t.wid) {
        return false;
    }
    s.set_intent(t.wid, None);
    finish_op(s, c);
    true
}

/// The proxy dies (or OLD's COMMIT fails). Before OLD's commit both sides roll back; after it
/// NEW rolls back and the client hears nothing; after NEW's commit the intent is left behind.
fn client_crash(s: &mut State, c: u8) -> bool {
    let Some(t) = client_tx(s, c) else {
        return false;
    };
    match t.step {
        ClientStep::Apply(_) | ClientStep::CommitOld(_) => {
            release_new(s, Owner::Client(c));
            release_old(s, Owner::Client(c));
        }
        ClientStep::CommitNew { .. } => release_new(s, Owner::Client(c)),
        ClientStep::DeleteIntent => {}
    }
    finish_op(s, c);
    true
}

fn repair_holds(s: &State, wid: Val) -> bool {
    match s.repair {
        RepairStep::Idle => false,
        RepairStep::IntentLocked { wid: w }
        | RepairStep::Read { wid: w, .. }
        | RepairStep::KeyLocked { wid: w }
        | RepairStep::Applying { wid: w, .. }
        | RepairStep::NewCommitted { wid: w } => w == wid,
    }
}

/// The repair locks a committed intent (the proxy's own failed one, or a stale one).
fn repair_pick(s: &mut State, wid: Val) -> bool {
    if s.repair != RepairStep::Idle || s.intent(wid).is_none() {
        return false;
    }
    s.repair = RepairStep::IntentLocked { wid };
    true
}

/// Whether the client transaction that wrote intent `wid` still has its NEW transaction (and
/// with it the uncommitted applied row) open: the repair's claim of the applied row waits.
fn owner_new_open(s: &State, wid: Val) -> bool {
    s.clients
        .iter()
        .filter_map(|c| c.tx)
        .any(|t| t.wid == wid && matches!(t.step, ClientStep::CommitNew { .. }))
}

/// Today's repair: read OLD `FOR UPDATE` (which locks only keys OLD has), then claim the
/// applied row on NEW. `None`: not one of these steps.
fn repair_step_today(s: &mut State) -> Option<bool> {
    match s.repair {
        RepairStep::IntentLocked { wid } => {
            let key = s.intent(wid)?.key;
            let k = usize::from(key);
            if s.old[k].is_some() {
                if s.old_lock[k].is_some_and(|o| o != Owner::Repair) {
                    return Some(false);
                }
                s.old_lock[k] = Some(Owner::Repair);
            }
            s.repair = RepairStep::Read {
                wid,
                image: s.old[k],
                pos: s.old_pos[k],
            };
            Some(true)
        }
        RepairStep::Read { wid, image, pos } => {
            if owner_new_open(s, wid) {
                return Some(false);
            }
            let intent = s.intent(wid)?;
            s.repair = if intent.applied {
                RepairStep::NewCommitted { wid }
            } else {
                RepairStep::Applying {
                    wid,
                    tx: NewTx {
                        key: intent.key,
                        image,
                        phase: NewPhase::Start,
                    },
                    pos,
                }
            };
            Some(true)
        }
        _ => None,
    }
}

/// The new repair: lock the key on NEW (upsert of its record) and claim the applied row, then
/// read OLD without locks. `None`: not one of these steps.
fn repair_step_new(s: &mut State) -> Option<bool> {
    match s.repair {
        RepairStep::IntentLocked { wid } => {
            let intent = s.intent(wid)?;
            let k = usize::from(intent.key);
            if s.new_lock[k].is_some_and(|o| o != Owner::Repair) {
                return Some(false);
            }
            if intent.applied {
                s.repair = RepairStep::NewCommitted { wid };
            } else {
                s.new_lock[k] = Some(Owner::Repair);
                s.repair = RepairStep::KeyLocked { wid };
            }
            Some(true)
        }
        RepairStep::KeyLocked { wid } => {
            let key = s.intent(wid)?.key;
            let k = usize::from(key);
            s.repair = RepairStep::Applying {
                wid,
                tx: NewTx {
                    key,
                    image: s.old[k],
                    phase: NewPhase::Start,
                },
                pos: s.old_pos[k],
            };
            Some(true)
        }
        _ => None,
    }
}

/// The repair fails or its worker dies: its NEW transaction (if open) and its OLD transaction
/// roll back; the intent stays.
fn repair_fails(s: &mut State) -> bool {
    if s.repair == RepairStep::Idle {
        return false;
    }
    release_new(s, Owner::Repair);
    release_old(s, Owner::Repair);
    s.repair = RepairStep::Idle;
    true
}

/// The first key at or after `from` that the snapshot has a row for (`KEYS` if none).
fn next_copy(snap: &[Option<Val>; KEYS], from: usize) -> u8 {
    let k = (from..KEYS).find(|&k| snap[k].is_some()).unwrap_or(KEYS);
    u8::try_from(k).unwrap_or(u8::MAX)
}

/// One step of the backfill chunk (the fast path).
fn backfill_step(s: &mut State) -> bool {
    match s.backfill {
        Backfill::Start => {
            s.backfill = Backfill::Recorded {
                taken: s.new_rec.map(|r| r.is_some()),
            };
        }
        Backfill::Recorded { taken } => {
            let mut snap = s.old;
            for (v, t) in snap.iter_mut().zip(taken) {
                if t {
                    *v = None;
                }
            }
            s.backfill = Backfill::Copying {
                snap,
                next: next_copy(&snap, 0),
            };
        }
        Backfill::Copying { snap, next } if usize::from(next) < KEYS => {
            let k = usize::from(next);
            // COPY's insert waits for a transaction that inserted, updated or deleted the
            // key's row and is still open; then a row on NEW is a unique violation, which rolls
            // the chunk back (the real worker redoes it the merge way; here: the fast path
            // again, which now leaves the recorded key out).
            if s.staged_on(k).is_some_and(|tx| tx.touches_row()) {
                return false;
            }
            if s.new_row[k].is_some() {
                return backfill_fails(s);
            }
            s.chunk_rows[k] = snap[k];
            s.backfill = Backfill::Copying {
                snap,
                next: next_copy(&snap, k + 1),
            };
        }
        Backfill::Copying { .. } => {
            // The fence lock exclusive waits for every mirrored delete still open; then the
            // sweep deletes the range's rows that have a tombstone, and the chunk commits.
            if s.fence_shared != 0 {
                return false;
            }
            for k in 0..KEYS {
                let tombstone = s.new_rec[k].is_some_and(|r| r.deleted);
                if tombstone {
                    if s.new_row[k].is_some() && s.staged_on(k).is_some() {
                        return false;
                    }
                    s.chunk_rows[k] = None;
                    s.new_row[k] = None;
                }
            }
            for k in 0..KEYS {
                if let Some(v) = s.chunk_rows[k].take() {
                    if s.new_rec[k].is_some() || s.new_row[k].is_some() {
                        s.backfill_overwrote = true;
                    }
                    s.new_row[k] = Some(v);
                }
            }
            s.backfill = Backfill::Done;
        }
        Backfill::Done => return false,
    }
    true
}

/// The chunk's transaction fails (deadlock victim, worker killed): it rolls back and the chunk
/// is pending again.
fn backfill_fails(s: &mut State) -> bool {
    if matches!(s.backfill, Backfill::Start | Backfill::Done) {
        return false;
    }
    s.chunk_rows = [None; KEYS];
    s.backfill = Backfill::Start;
    true
}

/// The actions a state may take (some are then found disabled by [`DualWrite::step`]).
pub(crate) fn candidate_actions(m: &DualWrite, s: &State, out: &mut Vec<Action>) {
    for c in 0..CLIENTS {
        let c8 = u8::try_from(c).unwrap_or(u8::MAX);
        match s.clients[c].tx.map(|t| t.step) {
            None => {
                if s.clients[c].ops_done < m.ops_per_client {
                    for key in 0..KEYS {
                        let key = u8::try_from(key).unwrap_or(u8::MAX);
                        out.push(Action::Begin {
                            client: c8,
                            key,
                            delete: false,
                        });
                        out.push(Action::Begin {
                            client: c8,
                            key,
                            delete: true,
                        });
                    }
                }
            }
            Some(ClientStep::Apply(_)) => {
                out.extend([
                    Action::ClientNew(c8),
                    Action::ClientNewFails(c8),
                    Action::ClientCrash(c8),
                ]);
            }
            Some(ClientStep::CommitOld(new)) => {
                out.extend([Action::ClientCommitOld(c8), Action::ClientCrash(c8)]);
                if new.is_some() {
                    out.push(Action::ClientNewFails(c8));
                }
            }
            Some(ClientStep::CommitNew { .. }) => {
                out.extend([
                    Action::ClientCommitNew(c8),
                    Action::ClientNewFails(c8),
                    Action::ClientCrash(c8),
                ]);
            }
            Some(ClientStep::DeleteIntent) => {
                out.extend([Action::ClientDeleteIntent(c8), Action::ClientCrash(c8)]);
            }
        }
    }
    if s.repair == RepairStep::Idle {
        for (i, intent) in s.intents.iter().enumerate() {
            if intent.is_some() {
                let wid = FIRST_WID + u8::try_from(i).unwrap_or(u8::MAX);
                out.push(Action::RepairPick(wid));
            }
        }
    } else {
        out.extend([Action::RepairStep, Action::RepairFails]);
    }
    if s.backfill != Backfill::Done {
        out.push(Action::BackfillStep);
        if s.backfill != Backfill::Start {
            out.push(Action::BackfillFails);
        }
    }
}
