//! Helpers shared by the binary's tests: temporary config files, a free port, the proxy run
//! as its own process.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use switchyard_test_support::TestDb;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

pub fn temp_config(text: &str) -> tempfile_path::TempPath {
    tempfile_path::TempPath::with(text)
}

/// A config file that deletes itself.
pub mod tempfile_path {
    use super::*;
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn with(text: &str) -> TempPath {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("sy-cli-{}-{n}.toml", std::process::id()));
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(text.as_bytes()).unwrap();
            TempPath(path)
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proxy {
    pub child: Child,
    pub port: u16,
    pub cfg: tempfile_path::TempPath,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy with `proxy_extra` lines added to `[proxy]`, `sections` (`[auth]` and the rest) after
/// `[old]` and `[new]`, and its log (stdout) sent to `log`.
pub fn start_proxy_with(old: &TestDb, new: &TestDb, proxy_extra: &str, sections: &str, log: Stdio) -> Proxy {
    let port = free_port();
    let cfg = temp_config(&format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"off\"\nshutdown_grace_secs = 20\n{proxy_extra}\
         [old]\nurl = \"{}\"\n[new]\nurl = \"{}\"\n{sections}",
        old.url(),
        new.url()
    ));
    let child = Command::new(BIN)
        .arg("proxy")
        .arg("--config")
        .arg(&cfg.0)
        .stdout(log)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proxy { child, port, cfg }
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Runs `switchyard ARGS... --config CFG` off the async runtime.
pub async fn cli(cfg: &tempfile_path::TempPath, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).arg("--config").arg(&cfg.0);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// A command's stdout and stderr together, for messages and searches.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until `n` proxies renew their heartbeat in the control state.
pub async fn wait_for_heartbeats(old: &TestDb, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while heartbeats(old).await < n {
        assert!(
            Instant::now() < deadline,
            "{n} proxies never showed up in the heartbeat table"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Live proxies in the control state's heartbeat table.
pub async fn heartbeats(old: &TestDb) -> i64 {
    old
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM switchyard.switchyard_proxies WHERE seen_at > clock_timestamp() - interval '1 second'",
            &[],
        )
        .await
        .map_or(0, |r| r.get(0))
}
