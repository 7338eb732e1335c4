//! A TCP relay that breaks the link between the proxy under test and a store.
//!
//! A [`FaultProxy`] listens on `127.0.0.1:<ephemeral>` and forwards every
//! accepted connection to one upstream address (in practice the NEW
//! database). A test points the proxy's NEW URL at [`FaultProxy::addr`] and
//! then injects network faults while traffic flows:
//!
//! | fault | models |
//! |---|---|
//! | [`set_delay`](FaultProxy::set_delay) | a slow network: every chunk waits before it is forwarded |
//! | [`set_blackhole`](FaultProxy::set_blackhole) | a partition: packets vanish, nobody sees an error, traffic hangs |
//! | [`reset_all`](FaultProxy::reset_all) | a connection reset or a server restart, as the client sees it |
//! | [`set_refuse`](FaultProxy::set_refuse) | the server being down: new connections are reset at once |
//!
//! The fault settings live in a `tokio::sync::watch` channel owned by the
//! [`FaultProxy`]; every relay task waits on it next to its socket I/O, so a
//! change takes effect as soon as the runtime runs the task, also for tasks
//! parked in a read. Dropping the [`FaultProxy`] ends every task it started.
//! There is no global state: any number of relays may run side by side, on any
//! tokio runtime (current-thread included).

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bytes read (and held) at most per direction of one relayed connection.
const CHUNK_BYTES: usize = 16 * 1024;

/// Pause after a failed `accept` (for example when out of file descriptors),
/// so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// The faults in force, shared by the accept loop and every relay task.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    delay: Duration,
    blackhole: bool,
    refuse: bool,
    /// Bumped by `reset_all`: a connection accepted under an older value is
    /// reset.
    resets: u64,
    /// Set by Drop: every task ends.
    closed: bool,
}

impl Faults {
    /// Whether a connection accepted when `resets` was `generation` must die.
    fn kills(&self, generation: u64) -> bool {
        self.closed || self.resets != generation
    }
}

/// Counters the tasks update and the [`FaultProxy`] reads.
#[derive(Debug, Default)]
struct Counters {
    live: AtomicUsize,
    accepted: AtomicU64,
}

/// A TCP relay on `127.0.0.1:<ephemeral>` forwarding every accepted
/// connection to one upstream address, with faults switched on and off at
/// run time.
///
/// With no fault set it is a transparent byte relay: half-closes are
/// forwarded, and an error on either side resets both. Dropping it stops
/// accepting and resets every relayed connection (as [`reset_all`] does),
/// once the runtime next runs the relay tasks.
///
/// [`reset_all`]: FaultProxy::reset_all
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    faults: watch::Sender<Faults>,
    counters: Arc<Counters>,
}

impl FaultProxy {
    /// Listen on `127.0.0.1:0` and relay every connection to `upstream`.
    ///
    /// Must be called inside a tokio runtime; the relay tasks run on it (via
    /// `tokio::spawn`) until this value is dropped. The upstream is only
    /// dialled when a client connects, so it need not be up yet.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (faults, watcher) = watch::channel(Faults::default());
        let counters = Arc::new(Counters::default());
        tokio::spawn(accept_loop(listener, upstream, watcher, Arc::clone(&counters)));
        tracing::debug!(%addr, %upstream, "fault proxy listening");
        Ok(FaultProxy {
            addr,
            faults,
            counters,
        })
    }

    /// Where clients connect (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Slow network: wait `delay` before forwarding each chunk read, in both
    /// directions, so a request-response round trip takes at least twice
    /// `delay`. [`Duration::ZERO`] turns the delay off; chunks already
    /// waiting finish their old delay.
    pub fn set_delay(&self, delay: Duration) {
        self.update(|f| set_field(&mut f.delay, delay));
    }

    /// Network partition where packets vanish: while on, no byte (and no
    /// half-close) moves in either direction on any connection. Nothing is
    /// dropped: the relay stops reading, data stays in socket buffers (at
    /// most one chunk per direction is held by the relay), and neither side
    /// sees an error, so reads hang until their own timeouts fire. New
    /// connections are accepted but not dialled upstream until the blackhole
    /// is lifted. Off: everything held flows on.
    pub fn set_blackhole(&self, on: bool) {
        self.update(|f| set_field(&mut f.blackhole, on));
    }

    /// Server down: while on, new connections are accepted and reset at once
    /// (`SO_LINGER` 0, so the client sees `ECONNRESET`, not a clean close);
    /// upstream is never dialled. Connections already relayed are untouched.
    pub fn set_refuse(&self, on: bool) {
        self.update(|f| set_field(&mut f.refuse, on));
    }

    /// Connection reset, or a server restart as the client sees it: abort
    /// every current connection, sending RST to both the client and the
    /// upstream, so both ends see the connection die at once (the upstream
    /// backend ends its session). Applies to blackholed connections too, and
    /// to connections still dialling upstream. Connections accepted
    /// afterwards are relayed normally.
    ///
    /// The resets are sent by the relay tasks, so they happen once the
    /// runtime runs them (at the test's next `.await` on a current-thread
    /// runtime); [`connections`](Self::connections) drops to 0 after that.
    pub fn reset_all(&self) {
        self.faults.send_modify(|f| f.resets = f.resets.wrapping_add(1));
    }

    /// Relayed connections still open: accepted (and not refused) and not yet
    /// closed, including those waiting to dial upstream.
    pub fn connections(&self) -> usize {
        self.counters.live.load(Ordering::SeqCst)
    }

    /// Connections accepted since start, refused ones included.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    fn update(&self, change: impl FnOnce(&mut Faults) -> bool) {
        self.faults.send_if_modified(change);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping the sender alone would also end the tasks (their
        // `changed()` fails); saying so explicitly keeps that visible.
        self.faults.send_modify(|f| f.closed = true);
    }
}

/// Store `new` in `slot`; whether that changed it.
fn set_field<T: PartialEq>(slot: &mut T, new: T) -> bool {
    let changed = *slot != new;
    *slot = new;
    changed
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    counters: Arc<Counters>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = faults.changed() => {
                if changed.is_err() || faults.borrow_and_update().closed {
                    return;
                }
                continue;
            }
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(err) => {
                tracing::debug!(error = %err, "fault proxy accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        let now = *faults.borrow_and_update();
        if now.closed {
            return;
        }
        if now.refuse {
            abort(client);
            continue;
        }
        let live = LiveGuard::new(Arc::clone(&counters));
        tokio::spawn(relay(client, upstream, faults.clone(), now.resets, live));
    }
}

/// Counts one live connection until dropped.
struct LiveGuard(Arc<Counters>);

impl LiveGuard {
    fn new(counters: Arc<Counters>) -> Self {
        counters.live.fetch_add(1, Ordering::SeqCst);
        LiveGuard(counters)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Relay one accepted connection until both directions end or it is reset.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    generation: u64,
    _live: LiveGuard,
) {
    let dialled = dial(upstream, &mut faults, generation).await;
    let mut server = match dialled {
        Ok(server) => server,
        Err(err) => {
            tracing::debug!(%upstream, error = %err, "fault proxy: no upstream connection");
            abort(client);
            return;
        }
    };
    // Small messages must not wait for Nagle; errors here only cost latency.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);

    let outcome = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        tokio::try_join!(
            pump(&mut client_read, &mut server_write, faults.clone(), generation),
            pump(&mut server_read, &mut client_write, faults, generation),
        )
    };
    if let Err(err) = outcome {
        tracing::debug!(error = %err, "fault proxy: connection reset");
        abort(client);
        abort(server);
    }
}

/// Connect to `upstream` once no blackhole is in force (a partition swallows
/// the SYN too); `Err` if that fails or the connection must be reset first.
async fn dial(
    upstream: SocketAddr,
    faults: &mut watch::Receiver<Faults>,
    generation: u64,
) -> io::Result<TcpStream> {
    loop {
        wait_open(faults, generation).await?;
        if let Some(dialled) = guarded(faults, generation, TcpStream::connect(upstream)).await? {
            return dialled;
        }
    }
}

/// Copy `from` to `to` chunk by chunk, applying the faults, until `from` ends
/// (then forward the half-close) or the connection must be reset (`Err`).
async fn pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    mut faults: watch::Receiver<Faults>,
    generation: u64,
) -> io::Result<()> {
    let mut buf = vec![0; CHUNK_BYTES].into_boxed_slice();
    loop {
        // Tokio's socket reads and writes are cancel safe: a read dropped by
        // `guarded` has consumed nothing, a write dropped there wrote nothing.
        let read = loop {
            let delay = wait_open(&mut faults, generation).await?.delay;
            if let Some(read) = guarded(&mut faults, generation, from.read(&mut buf)).await? {
                break (read?, delay);
            }
        };
        let (len, delay) = read;
        if !delay.is_zero() {
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            while guarded(&mut faults, generation, &mut sleep).await?.is_none() {}
        }
        if len == 0 {
            wait_open(&mut faults, generation).await?;
            return to.shutdown().await;
        }
        let mut sent = 0;
        while sent < len {
            wait_open(&mut faults, generation).await?;
            if let Some(written) = guarded(&mut faults, generation, to.write(&buf[sent..len])).await? {
                match written? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    n => sent += n,
                }
            }
        }
    }
}

/// Wait until no blackhole is in force; `Err` if the connection must be reset.
async fn wait_open(faults: &mut watch::Receiver<Faults>, generation: u64) -> io::Result<Faults> {
    loop {
        let now = *faults.borrow_and_update();
        if now.kills(generation) {
            return Err(reset_error());
        }
        if !now.blackhole {
            return Ok(now);
        }
        faults.changed().await.map_err(|_| reset_error())?;
    }
}

/// Run `work` until it finishes (`Some`) or the faults change first (`None`,
/// `work` dropped); `Err` if the change means the connection must be reset.
async fn guarded<F: Future>(
    faults: &mut watch::Receiver<Faults>,
    generation: u64,
    work: F,
) -> io::Result<Option<F::Output>> {
    tokio::select! {
        done = work => Ok(Some(done)),
        changed = faults.changed() => {
            changed.map_err(|_| reset_error())?;
            if faults.borrow_and_update().kills(generation) {
                return Err(reset_error());
            }
            Ok(None)
        }
    }
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "reset by FaultProxy")
}

/// Close `stream` with RST instead of FIN, so the peer sees `ECONNRESET`.
fn abort(stream: TcpStream) {
    // If SO_LINGER cannot be set the close is a plain FIN: still a close.
    let _ = stream.set_zero_linger();
    drop(stream);
}
