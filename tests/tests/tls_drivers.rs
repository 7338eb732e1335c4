//! TLS toward clients with the drivers of other languages: psycopg 3 and asyncpg (Python),
//! pgjdbc (Java) and node-postgres each log in with SCRAM through a proxy with
//! `[tls] mode = "require"`, in `sslmode=require` and `verify-full` (a CA made by the test, the
//! certificate's name checked), with channel binding where the driver has it; a wrong CA, a
//! certificate for another name, plain text and a wrong password are each refused. psql is
//! tested in every `sslmode` in cli/tests/tls.rs.
//!
//! The drivers run small programs from tests/clients, one case per connection, and report
//! each outcome; the assertions are here. `.ci/run` installs what they need (Python packages,
//! `npm ci` in tests/clients, the Debian pgjdbc and a JDK); a missing one fails the test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use switchyard_test_support::{Certs, ProxyConfig, TestDb, TestProxy};
use tokio::process::Command;

const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients");
/// Where Debian's libpostgresql-jdbc-java puts pgjdbc.
const PGJDBC: &str = "/usr/share/java/postgresql.jar";
const PASSWORD: &str = "tls-driver-secret";
/// The common name of the certificate the proxy serves to the cases that succeed.
const SERVED_CN: &str = "switchyard-drivers";
/// For all the cases of one driver (each connection attempt has a 10 s timeout of its own).
const CLIENT_LIMIT: Duration = Duration::from_secs(180);

/// Two proxies in front of one database, both `mode = "require"` with SCRAM: `proxy` serves a
/// certificate for 127.0.0.1 from the test's CA, `misnamed` one from the same CA for another
/// name only.
struct TlsProxies {
    old: TestDb,
    _new: TestDb,
    /// The certificates, the users file and the compiled Java client.
    certs: Certs,
    proxy: TestProxy,
    misnamed: TestProxy,
}

impl TlsProxies {
    async fn start(label: &str) -> anyhow::Result<TlsProxies> {
        let certs = Certs::new(label);
        certs.ca("ca");
        certs.server("server", SERVED_CN, "ca");
        certs.leaf(
            "misnamed",
            "elsewhere.invalid",
            "ca",
            "subjectAltName=DNS:elsewhere.invalid\n",
        );
        // A CA that signed neither certificate.
        certs.ca("stranger");
        let users = certs.path("users.toml");
        std::fs::write(
            &users,
            format!("[[users]]\nname = \"postgres\"\npassword = \"{PASSWORD}\"\n"),
        )?;
        let (old, new) = TestDb::create_pair(label).await?;
        let start = |cert: &str| {
            let mut config =
                ProxyConfig::passthrough(old.url(), new.url()).with_auth("scram-sha-256", &users);
            config.admin = false;
            config.extra_sections.push(format!(
                "[tls]\nmode = \"require\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
                certs.path(&format!("{cert}.pem")).display(),
                certs.path(&format!("{cert}.key")).display()
            ));
            async move { TestProxy::start(&config).await }
        };
        let proxy = start("server").await?;
        let misnamed = start("misnamed").await?;
        Ok(TlsProxies {
            old,
            _new: new,
            certs,
            proxy,
            misnamed,
        })
    }
}

/// One connection attempt: which proxy, how, and what must come of it.
struct Case {
    name: &'static str,
    port: u16,
    sslmode: &'static str,
    rootcert: Option<PathBuf>,
    password: &'static str,
    expect: Expect,
}

enum Expect {
    /// Logged in, ran the query, and, where the driver shows its TLS session, it is one.
    Served,
    /// Logged in with the certificate verified: where the driver shows the peer's name, it is
    /// [`SERVED_CN`].
    Verified,
    /// Refused with an error containing this text.
    Refused(String),
}

/// What differs between drivers: how to run the client, whether it can bind the channel, what
/// it shows of its TLS session, and its wording of the two certificate failures.
struct Driver {
    name: &'static str,
    channel_binding: bool,
    /// What the client reports of every login that succeeded.
    served_shows: &'static [&'static str],
    /// What it reports in addition when it verified the certificate.
    verified_shows: &'static [&'static str],
    untrusted_ca: &'static str,
    wrong_name: &'static str,
}

const PSYCOPG: Driver = Driver {
    name: "psycopg",
    channel_binding: true,
    served_shows: &["tls=on"],
    verified_shows: &[],
    untrusted_ca: "certificate verify failed",
    wrong_name: "does not match host name",
};
const ASYNCPG: Driver = Driver {
    name: "asyncpg",
    channel_binding: false,
    served_shows: &["tls=TLSv1.3"],
    verified_shows: &["cn=switchyard-drivers"],
    untrusted_ca: "unable to get local issuer certificate",
    wrong_name: "IP address mismatch",
};
const PGJDBC_DRIVER: Driver = Driver {
    name: "pgjdbc",
    channel_binding: true,
    served_shows: &[],
    // Seen by pgjdbc's host name check, which runs in verify-full only.
    verified_shows: &["tls=TLSv1.3", "cn=switchyard-drivers"],
    untrusted_ca: "unable to find valid certification path",
    wrong_name: "could not be verified by hostnameverifier",
};
const NODE_POSTGRES: Driver = Driver {
    name: "node-postgres",
    channel_binding: true,
    served_shows: &["tls=TLSv1.3", "mech=SCRAM-SHA-256-PLUS"],
    verified_shows: &["cn=switchyard-drivers"],
    // The proxy sends its certificate alone, without the chain: Node then names the leaf.
    untrusted_ca: "unable to verify the first certificate",
    wrong_name: "does not match certificate's altnames",
};

fn cases(env: &TlsProxies, driver: &Driver) -> Vec<Case> {
    let ca = || Some(env.certs.path("ca.pem"));
    let good = env.proxy.port();
    let case = |name, port, sslmode, rootcert, expect| Case {
        name,
        port,
        sslmode,
        rootcert,
        password: PASSWORD,
        expect,
    };
    vec![
        case("require", good, "require", None, Expect::Served),
        case("verify_full", good, "verify-full", ca(), Expect::Verified),
        case(
            "untrusted_ca",
            good,
            "verify-full",
            Some(env.certs.path("stranger.pem")),
            Expect::Refused(driver.untrusted_ca.to_owned()),
        ),
        // The same CA, a certificate for another name: only the name check can refuse it, and
        // without that check the same proxy serves.
        case(
            "wrong_name",
            env.misnamed.port(),
            "verify-full",
            ca(),
            Expect::Refused(driver.wrong_name.to_owned()),
        ),
        case(
            "wrong_name_unchecked",
            env.misnamed.port(),
            "require",
            None,
            Expect::Served,
        ),
        // Plain text is refused as a hostssl-only server refuses it.
        case(
            "plain_text",
            good,
            "disable",
            None,
            Expect::Refused(format!(
                "no pg_hba.conf entry for host \"127.0.0.1\", user \"postgres\", database \"{}\", no encryption",
                env.old.name()
            )),
        ),
        Case {
            password: "not-the-password",
            ..case(
                "wrong_password",
                good,
                "require",
                None,
                Expect::Refused("password authentication failed for user \"postgres\"".to_owned()),
            )
        },
    ]
}

/// The command running `driver`'s client program (compiling the Java one into `build`).
async fn client_command(driver: &Driver, build: &Path) -> anyhow::Result<Command> {
    Ok(match driver.name {
        "psycopg" | "asyncpg" => {
            let mut cmd = Command::new("python3");
            cmd.arg(format!("{CLIENTS}/tls_python.py")).arg(driver.name);
            cmd
        }
        "pgjdbc" => {
            ensure!(
                Path::new(PGJDBC).exists(),
                "{PGJDBC} is missing (Debian: apt-get install libpostgresql-jdbc-java)"
            );
            let javac = Command::new("javac")
                .args(["-cp", PGJDBC, "-d"])
                .arg(build)
                .arg(format!("{CLIENTS}/TlsClient.java"))
                .output()
                .await
                .context("running javac (Debian: apt-get install default-jdk-headless)")?;
            ensure!(
                javac.status.success(),
                "javac: {}",
                String::from_utf8_lossy(&javac.stderr)
            );
            let mut cmd = Command::new("java");
            cmd.arg("-cp")
                .arg(format!("{}:{PGJDBC}", build.display()))
                .arg("TlsClient");
            cmd
        }
        "node-postgres" => {
            ensure!(
                Path::new(CLIENTS).join("node_modules/pg").exists(),
                "node-postgres is not installed: run `npm ci` in {CLIENTS} (as .ci/run does)"
            );
            let mut cmd = Command::new("node");
            cmd.arg(format!("{CLIENTS}/tls_node.js"));
            cmd
        }
        other => bail!("no client program for {other}"),
    })
}

/// Runs every case with `driver` and checks each outcome.
async fn matrix(label: &str, driver: &Driver) -> anyhow::Result<()> {
    let env = TlsProxies::start(label).await?;
    let cases = cases(&env, driver);
    let mut cmd = client_command(driver, &env.certs.path("classes")).await?;
    cmd.arg(env.old.name());
    for case in &cases {
        let rootcert = case
            .rootcert
            .as_ref()
            .map_or("-".to_owned(), |p| p.display().to_string());
        let bind = if driver.channel_binding { "1" } else { "0" };
        cmd.arg(format!(
            "{},{},{},{rootcert},{},{bind}",
            case.name, case.port, case.sslmode, case.password
        ));
    }
    // Settings from the environment would change what the drivers do.
    for var in [
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "PGCHANNELBINDING",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
    ] {
        cmd.env_remove(var);
    }
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(CLIENT_LIMIT, cmd.output())
        .await
        .with_context(|| {
            format!(
                "the {} client did not finish within {CLIENT_LIMIT:?}",
                driver.name
            )
        })?
        .with_context(|| format!("running the {} client", driver.name))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = format!(
        "{} client ({}):\n{stdout}{}",
        driver.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{report}");
    eprintln!("{report}");
    let outcomes: HashMap<&str, (&str, &str)> = stdout
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, '\t');
            Some((fields.next()?, (fields.next()?, fields.next()?)))
        })
        .collect();
    for case in &cases {
        let (status, shown) = *outcomes
            .get(case.name)
            .with_context(|| format!("no outcome for {}: {report}", case.name))?;
        let what = format!("{} {}: {status} {shown}", driver.name, case.name);
        match &case.expect {
            Expect::Served | Expect::Verified => {
                ensure!(status == "ok", "{what}");
                ensure!(shown.contains(&format!("db={} ", env.old.name())), "{what}");
                // Plain text is refused, so a login is proof of TLS; where the driver shows
                // its session, it must say so too.
                let verified = matches!(case.expect, Expect::Verified);
                let extra = if verified { driver.verified_shows } else { &[] };
                for needed in driver.served_shows.iter().chain(extra) {
                    ensure!(shown.contains(needed), "{what}: expected {needed:?}");
                }
            }
            Expect::Refused(text) => {
                ensure!(status == "error", "{what}: must be refused");
                ensure!(shown.contains(text.as_str()), "{what}: expected {text:?}");
            }
        }
    }
    Ok(())
}

/// libpq through psycopg, with `channel_binding=require`: a login that is not
/// SCRAM-SHA-256-PLUS bound to the proxy's certificate would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_over_tls_with_channel_binding() -> anyhow::Result<()> {
    matrix("tlsdrv_psycopg", &PSYCOPG).await
}

/// asyncpg speaks only SCRAM-SHA-256 (no channel binding): it must log in over TLS while the
/// proxy offers SCRAM-SHA-256-PLUS first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_over_tls() -> anyhow::Result<()> {
    matrix("tlsdrv_asyncpg", &ASYNCPG).await
}

/// pgjdbc: `channelBinding=require` where this pgjdbc has it (42.7.4 and later); Debian 12's
/// 42.5 has not, and then logs in with SCRAM-SHA-256 without binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_over_tls() -> anyhow::Result<()> {
    matrix("tlsdrv_pgjdbc", &PGJDBC_DRIVER).await
}

/// node-postgres with `enableChannelBinding`: every login over TLS must have chosen
/// SCRAM-SHA-256-PLUS, and the proxy must have accepted its binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_over_tls_with_channel_binding() -> anyhow::Result<()> {
    matrix("tlsdrv_node", &NODE_POSTGRES).await
}
