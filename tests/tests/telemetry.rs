//! OpenTelemetry export: with `telemetry.otlp_endpoint` set, the proxy pushes its metrics over
//! OTLP/HTTP (protobuf) to `<endpoint>/v1/metrics`; at the latest when it stops.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_test_support::{ProxyConfig, TestDb, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A minimal OTLP/HTTP collector: records each request's line, content type and body size.
async fn collector() -> (std::net::SocketAddr, Arc<Mutex<Vec<(String, String, usize)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap_or(0));
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    let line = head.lines().next().unwrap_or_default().to_owned();
                    let ctype = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-type:"))
                        .unwrap_or_default()
                        .trim()
                        .to_owned();
                    record.lock().unwrap().push((line, ctype, len));
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    buf.drain(..end + 4 + len);
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_pushed_over_otlp_http() -> anyhow::Result<()> {
    let old = TestDb::create("otlp").await?;
    let new = TestDb::create("otlp_new").await?;
    let (addr, seen) = collector().await;
    let mut config = ProxyConfig::passthrough(old.url(), new.url());
    config.extra_sections.push(format!(
        "[telemetry]\notlp_endpoint = \"http://{addr}\"\nservice_name = \"sy-test\""
    ));
    let proxy = TestProxy::start(&config).await?;
    let client = proxy.client().await?;
    client.simple_query("select 1").await?;
    drop(client);
    proxy.stop().await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let requests = seen.lock().unwrap().clone();
        if let Some((_, ctype, len)) = requests
            .iter()
            .find(|(line, _, _)| line.starts_with("post /v1/metrics"))
        {
            assert_eq!(ctype, "application/x-protobuf");
            assert!(*len > 50, "an export with data points, got {len} bytes");
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no OTLP metrics export received; requests: {requests:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
