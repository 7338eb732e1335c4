//! A very large statement goes through the proxy in bounded memory, and the memory is given
//! back afterwards (issue 15: a 200 MB statement made the proxy's memory peak at about 1 GB and
//! kept 533 MB). The proxy runs in this test's process, and the client streams its statement
//! from a small buffer, so the process's peak and resident memory are the proxy's.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use switchyard_test_support::wire::RawConn;
use switchyard_test_support::{DualEnv, TestProxy};

/// The statement's size: `SELECT length('xxx...')` with this many `x`.
const LARGE: usize = 64 << 20;
const MIB: f64 = (1 << 20) as f64;

/// A field of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kb: u64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
    Ok(kb * 1024)
}

/// Sends `SELECT length('x...')` of [`LARGE`] characters in 1 MiB pieces and checks the answer;
/// returns the session, still open.
async fn large_query(addr: SocketAddr, db: &str) -> anyhow::Result<RawConn> {
    let (mut conn, _) = RawConn::login(addr, "postgres", db).await?;
    // The answer takes seconds in a debug build (the dual-write relay parses the statement), and
    // several times that on a loaded machine: this test is about memory, not time.
    conn.set_read_timeout(Duration::from_secs(120));
    let (head, tail) = (&b"SELECT length('"[..], &b"')\0"[..]);
    let len = 4 + head.len() + LARGE + tail.len();
    let mut start = vec![b'Q'];
    start.extend_from_slice(&i32::try_from(len)?.to_be_bytes());
    start.extend_from_slice(head);
    conn.send(&start).await?;
    let piece = vec![b'x'; 1 << 20];
    for _ in 0..LARGE / piece.len() {
        conn.send(&piece).await?;
    }
    conn.send(tail).await?;
    let answer = conn.read_until_ready(1).await?;
    let row = answer
        .iter()
        .find(|m| m.tag == b'D')
        .with_context(|| format!("no row: {answer:?}"))?;
    ensure!(
        row.body.ends_with(LARGE.to_string().as_bytes()),
        "unexpected row {row:?}"
    );
    Ok(conn)
}

/// Runs [`large_query`] through the proxy at `addr` and returns (peak growth, resident growth
/// once the session is over), in bytes. The peak is reset first (`clear_refs`).
async fn measure(addr: SocketAddr, db: &str) -> anyhow::Result<(u64, i64)> {
    let before = status_bytes("VmRSS:")?;
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak")?;
    let conn = large_query(addr, db).await?;
    // Measured while the session is still open: a session that stays must not keep the
    // memory either. (The proxy has written the answer; a moment for its task to go round.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let peak = status_bytes("VmHWM:")?;
    let after = status_bytes("VmRSS:")?;
    drop(conn);
    Ok((peak.saturating_sub(before), after as i64 - before as i64))
}

fn check(mode: &str, (peak, kept): (u64, i64)) -> anyhow::Result<()> {
    eprintln!(
        "{mode}: a {:.0} MiB statement raised the peak by {:.0} MiB; {:.0} MiB kept after it",
        LARGE as f64 / MIB,
        peak as f64 / MIB,
        kept as f64 / MIB
    );
    ensure!(
        (peak as f64) < 2.5 * LARGE as f64,
        "{mode}: peak grew by {:.0} MiB",
        peak as f64 / MIB
    );
    ensure!(
        (kept as f64) < 48.0 * MIB,
        "{mode}: {:.0} MiB kept after the statement",
        kept as f64 / MIB
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_statement_is_relayed_in_bounded_memory_and_the_memory_given_back() -> anyhow::Result<()> {
    let env = DualEnv::kv("large_msg").await?;
    let passthrough = TestProxy::passthrough(env.old.url(), env.new.url()).await?;
    // A warm-up, so the allocator's and the runtime's own start-up is not counted.
    drop(large_query(passthrough.addr, env.old.name()).await?);
    let relayed = measure(passthrough.addr, env.old.name()).await?;
    passthrough.stop().await?;

    let dual = env.proxy().await?;
    let mirrored = measure(dual.addr, env.old.name()).await?;
    dual.stop().await?;
    check("passthrough", relayed)?;
    check("dual_write", mirrored)
}
