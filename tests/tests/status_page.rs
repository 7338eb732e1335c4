//! The status page in a real browser: headless Chromium loads `GET /` from a proxy with a table
//! in `dual_write` and two recorded drift samples; the figures the page shows equal `/status`,
//! the chart has both points, and the page reports no error. A screenshot is written to
//! `$CARGO_TARGET_TMPDIR/status-page.png`.

use std::process::Command;

use switchyard_config::{Phase, StoreUrl, TableName, TableSettings, UncapturedPolicy};
use switchyard_drift::{DriftTable, Recorded};
use switchyard_store::Role;
use switchyard_test_support::DualEnv;

fn chromium(args: &[&str]) -> std::process::Output {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .args(args)
        .output()
        .expect("chromium (Debian package `chromium`, installed by .ci/run)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The text of the cell `data-table="table" data-field="field"` in `dom`.
fn cell<'a>(dom: &'a str, table: &str, field: &str) -> &'a str {
    let marker = format!("data-table=\"{table}\" data-field=\"{field}\">");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no {field} cell in the page:\n{dom}"))
        + marker.len();
    let end = dom[start..].find('<').unwrap() + start;
    &dom[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_what_status_says_with_a_chart_and_no_errors() {
    let env = DualEnv::kv("status_page").await.unwrap();
    let rows = "INSERT INTO kv SELECT i, 'v' || i FROM generate_series(1, 200) i";
    env.seed_old(rows).await.unwrap();
    env.new.execute_batch(rows).await.unwrap();
    env.new
        .execute_batch("UPDATE kv SET v = 'drifted' WHERE id <= 10")
        .await
        .unwrap();
    // Two samples recorded on NEW, as `switchyard drift sample` records them.
    let connect = |role, db: &switchyard_test_support::TestDb| {
        switchyard_drift::connect(role, &StoreUrl::parse(db.url()).unwrap()).unwrap()
    };
    let (old, new) = (connect(Role::Old, &env.old), connect(Role::New, &env.new));
    let settings = TableSettings {
        name: "public.kv".parse::<TableName>().unwrap(),
        phase: Phase::DualWrite,
        read_share: 0,
        shadow_share: 100,
        key: Vec::new(),
        on_uncaptured: UncapturedPolicy::Refuse,
        group: None,
    };
    let table = DriftTable::load(&old, &new, &settings).await.unwrap();
    for seed in [1, 2] {
        let r = switchyard_drift::sample(&old, &new, &table, 1000, seed, Default::default())
            .await
            .unwrap();
        switchyard_drift::record(&new, Recorded::Sample(&r), Phase::DualWrite, "test")
            .await
            .unwrap();
    }

    let proxy = env.proxy().await.unwrap();
    // The proxy reads the figures in the background, at start and then every few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        let (_, body) = proxy.admin_get("/status").await.unwrap();
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        let t = &status["tables"][0];
        if t["guard_rails"]["checked"] == true && t["drift"]["history"].as_array().map(Vec::len) == Some(2) {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no figures at /status: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let t = &status["tables"][0];
    let url = format!("http://{}/", proxy.admin_addr.unwrap());
    let (code, html) = proxy.admin_get("/").await.unwrap();
    assert_eq!(code, 200);
    for external in ["<script src", "<link", "@import", "url("] {
        assert!(
            !html.contains(external),
            "the page loads nothing from elsewhere ({external})"
        );
    }

    let dom =
        String::from_utf8(chromium(&["--virtual-time-budget=4000", "--dump-dom", &url]).stdout).unwrap();
    assert!(
        dom.contains("data-rendered=\"1\""),
        "the page rendered /status:\n{dom}"
    );
    assert!(
        dom.contains("<div id=\"errors\"></div>"),
        "the page reports an error:\n{dom}"
    );
    assert_eq!(cell(&dom, "public.kv", "phase"), t["phase"].as_str().unwrap());
    assert_eq!(
        cell(&dom, "public.kv", "read_share"),
        format!("{}%", t["read_share"])
    );
    let sample = &t["drift"]["sample"];
    let shown = cell(&dom, "public.kv", "drift_rate");
    let pct = |v: &serde_json::Value| format!("{:.4}%", v.as_f64().unwrap() * 100.0);
    assert!(
        shown.starts_with(&format!(
            "{} [{}, {}]",
            pct(&sample["rate"]),
            pct(&sample["ci95_low"]),
            pct(&sample["ci95_high"])
        )),
        "{shown} vs {sample}"
    );
    assert_eq!(pct(&sample["rate"]), "5.0000%", "10 of 200 keys differ");
    assert!(
        cell(&dom, "public.kv", "guard_rails").starts_with("refused"),
        "no backfill ran"
    );
    assert_eq!(
        cell(&dom, "public.kv", "next"),
        format!("{}: ", t["next"]["action"].as_str().unwrap()),
    );
    assert!(dom.contains(&format!(
        "<code>{}</code>",
        t["next"]["command"].as_str().unwrap()
    )));
    assert!(
        dom.contains("data-points=\"2\""),
        "the chart has both samples:\n{dom}"
    );
    assert_eq!(dom.matches("class=\"point\"").count(), 2);

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let arg = format!("--screenshot={}", shot.display());
    chromium(&[
        "--virtual-time-budget=4000",
        "--window-size=1200,1400",
        &arg,
        &url,
    ]);
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot of the page"
    );
}
