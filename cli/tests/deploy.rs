//! The files in `deploy/` against the binary and a running proxy: every query of the Grafana
//! dashboard names only metrics the proxy exports, and the systemd unit and the container file
//! start the binary with arguments it accepts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{temp_config, BIN};
use switchyard_test_support::DualEnv;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// The `switchyard_...` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("switchyard_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every `expr` and `query` string of the dashboard.
fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_the_proxy_exports() {
    let env = DualEnv::kv("deploy_dashboard").await.unwrap();
    env.seed_old("INSERT INTO kv SELECT i, 'v' || i FROM generate_series(1, 50) i")
        .await
        .unwrap();
    env.new
        .execute_batch("INSERT INTO kv SELECT i, 'v' || i FROM generate_series(1, 50) i")
        .await
        .unwrap();
    // A drift result recorded before the proxy starts, so its figures are exported at once.
    let cfg = temp_config(&format!(
        "[old]\nurl = \"{}\"\n[new]\nurl = \"{}\"\n[auth]\nmethod = \"trust\"\n\
         [[tables]]\nname = \"public.kv\"\nphase = \"dual_write\"\n",
        env.old.url(),
        env.new.url()
    ));
    let out = Command::new(BIN)
        .args(["drift", "sample", "--config"])
        .arg(&cfg.0)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let proxy = env.proxy().await.unwrap();
    let client = proxy.client().await.unwrap();
    client
        .batch_execute("INSERT INTO kv VALUES (100, 'through the proxy')")
        .await
        .unwrap();
    client
        .query("SELECT v FROM kv WHERE id = $1", &[&100i64])
        .await
        .unwrap();
    assert!(
        client.batch_execute("SELECT 1 / 0").await.is_err(),
        "an error to count"
    );

    // The proxy reads the drift figures in the background, at start and then every few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let metrics = loop {
        let (code, metrics) = proxy.admin_get("/metrics").await.unwrap();
        assert_eq!(code, 200);
        if metrics.contains("switchyard_drift_age_seconds{") {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no drift figures exported:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let exported: BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let text = std::fs::read_to_string(format!("{DEPLOY}/grafana/switchyard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    assert!(all.len() >= 10, "the dashboard has its queries: {all:?}");
    let named: BTreeSet<String> = all.iter().flat_map(|q| metric_names(q)).collect();
    assert!(named.len() >= 10, "{named:?}");
    for name in &named {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            exported.contains(name) || exported.contains(family),
            "the dashboard queries {name}, which the proxy does not export; it exports {exported:?}"
        );
    }
}

/// The words of a unit's `Key=` line (the first one), `%i` replaced by `instance`.
fn unit_command(unit: &str, key: &str, instance: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in the unit"));
    line.replace("%i", instance)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Runs `words` with the built binary in place of the installed one.
fn run(words: &[String]) -> std::process::Output {
    assert_eq!(words[0], "/usr/local/bin/switchyard", "{words:?}");
    Command::new(BIN).args(&words[1..]).output().unwrap()
}

#[test]
fn the_systemd_unit_and_the_container_start_the_binary_with_arguments_it_accepts() {
    let dir = std::env::temp_dir().join(format!("sy-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[old]\nurl = \"postgres://u@127.0.0.1:1/a\"\n[new]\nurl = \"postgres://u@127.0.0.1:1/b\"\n\
         [auth]\nmethod = \"trust\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("bad.toml"), "[proxy]\nlisten = \"nowhere\"\n").unwrap();
    let unit = std::fs::read_to_string(format!("{DEPLOY}/systemd/switchyard-proxy@.service")).unwrap();
    let instance = |name: &str| dir.join(name).display().to_string().replace(".toml", "");
    let rewrite = |words: Vec<String>| -> Vec<String> {
        words
            .into_iter()
            .map(|w| w.replace("/etc/switchyard/", ""))
            .collect()
    };
    // The check before start passes a good file and fails a bad one with its reason.
    let out = run(&rewrite(unit_command(&unit, "ExecStartPre", &instance("good"))));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&rewrite(unit_command(&unit, "ExecStart", &instance("bad"))));
    assert_eq!(out.status.code(), Some(1), "a config error, not a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.listen"));

    // The container runs ENTRYPOINT with CMD.
    let file = std::fs::read_to_string(format!("{DEPLOY}/container/Containerfile")).unwrap();
    let json_line = |key: &str| -> Vec<String> {
        let line = file
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in the Containerfile"));
        serde_json::from_str(line).unwrap()
    };
    let mut words = json_line("ENTRYPOINT");
    words.extend(json_line("CMD"));
    let words: Vec<String> = words
        .into_iter()
        .map(|w| {
            w.replace(
                "/etc/switchyard/switchyard.toml",
                &dir.join("bad.toml").display().to_string(),
            )
        })
        .collect();
    let out = run(&words);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.listen"));
    let _ = std::fs::remove_dir_all(&dir);
}
