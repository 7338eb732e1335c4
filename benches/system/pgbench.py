#!/usr/bin/env python3
"""System benchmark: pgbench against PostgreSQL directly, through the
Switchyard proxy and through pgbouncer (session mode), interleaved; with
--tls, every client connects over TLS (the proxy and pgbouncer serving the
same certificate).

Python 3 standard library only. See benches/system/README.md.

Every option has an environment-variable default (shown in --help), so both
`DURATION=3 ROUNDS=1 benches/system/pgbench.py` and
`benches/system/pgbench.py --duration 3 --rounds 1` work.

Exit status: 0 if every selected target ran every run successfully;
1 if a target (typically the proxy) was unavailable or a run failed;
2 if the setup itself failed (PostgreSQL unreachable, database creation...).
"""

import argparse
import atexit
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pglocal import fmt, median_or_none, port_open, ratio

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"  # loopback only, on purpose
DB_NAME = "switchyard_bench"
PG_USER = "postgres"

# name -> pgbench flags
BUILTIN_MODES = {
    "select-prepared": ["-S", "-M", "prepared"],
    "select-simple": ["-S", "-M", "simple"],
    "tpcb-prepared": ["-M", "prepared"],
    "tpcb-simple": ["-M", "simple"],
    "select-extended": ["-S", "-M", "extended"],
    # one connection (and, over TLS, one handshake) per transaction
    "connect-select": ["-C", "-S", "-M", "simple"],
}
DEFAULT_MODES = "select-prepared,select-simple,tpcb-prepared"
TLS_DEFAULT_MODES = "select-prepared,connect-select"
ALL_TARGETS = ("direct", "proxy", "pgbouncer")

CLK_TCK = os.sysconf("SC_CLK_TCK")
SSLMODE = "disable"  # set from --sslmode


def log(msg):
    print(msg, flush=True)


def warn(msg):
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def env(name, default):
    return os.environ.get(name, default)


def env_bool(name):
    return os.environ.get(name, "") not in ("", "0", "false", "no")


# --------------------------------------------------------------------------
# options


def parse_args():
    p = argparse.ArgumentParser(
        description="pgbench: direct PostgreSQL vs Switchyard proxy vs pgbouncer",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=int, default=int(env("DURATION", "10")),
                   help="seconds per pgbench run (env DURATION)")
    p.add_argument("--rounds", type=int, default=int(env("ROUNDS", "3")),
                   help="rounds per mode; each round runs every target once (env ROUNDS)")
    p.add_argument("--clients", type=int, default=int(env("CLIENTS", "8")),
                   help="pgbench -c (env CLIENTS)")
    p.add_argument("--threads", type=int, default=int(env("THREADS", "2")),
                   help="pgbench -j; lowered to divide --clients (env THREADS)")
    p.add_argument("--scale", type=int, default=int(env("SCALE", "10")),
                   help="pgbench -i -s (env SCALE)")
    p.add_argument("--warmup", type=int, default=int(env("WARMUP", "2")),
                   help="seconds of discarded warm-up per target per mode, 0 = none (env WARMUP)")
    p.add_argument("--modes", default=env("MODES", ""),
                   help="comma-separated modes; builtin: %s; or custom NAME=FLAGS "
                        "with FLAGS space-separated, e.g. 'sel-ext=-S -M extended' "
                        "(separate several with ';' when using custom ones); default %s, "
                        "with --tls %s (env MODES)"
                        % (", ".join(BUILTIN_MODES), DEFAULT_MODES, TLS_DEFAULT_MODES))
    p.add_argument("--targets", default=env("TARGETS", ",".join(ALL_TARGETS)),
                   help="comma-separated subset of direct,proxy,pgbouncer (env TARGETS)")
    p.add_argument("--proxy-bin", default=env("SWITCHYARD_BIN", str(REPO_ROOT / "target/release/switchyard")),
                   help="Switchyard binary (env SWITCHYARD_BIN)")
    p.add_argument("--proxy-config", default=env("SWITCHYARD_CONFIG", ""),
                   help="use this proxy config instead of the generated one (env SWITCHYARD_CONFIG)")
    p.add_argument("--proxy-wrapper", default=env("PROXY_WRAPPER", ""),
                   help="command prefix for the proxy, e.g. 'valgrind --tool=callgrind' "
                        "(must exec the proxy in the same process) (env PROXY_WRAPPER)")
    p.add_argument("--no-build", action="store_true", default=env_bool("NO_BUILD"),
                   help="do not run 'cargo build --release' when the proxy binary is missing (env NO_BUILD=1)")
    p.add_argument("--build-timeout", type=int, default=int(env("BUILD_TIMEOUT", "2400")),
                   help="seconds allowed for cargo build (env BUILD_TIMEOUT)")
    p.add_argument("--pg-port", type=int, default=int(env("PG_PORT", "5432")),
                   help="PostgreSQL port on 127.0.0.1 (env PG_PORT)")
    p.add_argument("--proxy-workers", type=int, default=int(env("PROXY_WORKERS", "1")),
                   help="proxy worker_threads in the generated config; 1 compares with "
                        "single-threaded pgbouncer at equal threads, 0 = one per CPU (the "
                        "product default) (env PROXY_WORKERS)")
    p.add_argument("--proxy-port", type=int, default=int(env("PROXY_PORT", "6532")),
                   help="Switchyard listen port (env PROXY_PORT)")
    p.add_argument("--pgbouncer-port", type=int, default=int(env("PGBOUNCER_PORT", "6533")),
                   help="pgbouncer listen port (env PGBOUNCER_PORT)")
    p.add_argument("--admin-port", type=int, default=int(env("ADMIN_PORT", "6590")),
                   help="Switchyard admin port (env ADMIN_PORT)")
    p.add_argument("--start-timeout", type=int, default=int(env("START_TIMEOUT", "30")),
                   help="seconds to wait for proxy/pgbouncer to accept connections (env START_TIMEOUT)")
    p.add_argument("--sslmode", default=env("SSLMODE", "disable"),
                   help="libpq sslmode for psql/pgbench on every target. 'disable' keeps the "
                        "comparison fair: pgbouncer here has no client TLS, while PostgreSQL "
                        "may (Debian enables ssl=on), and libpq's default 'prefer' would then "
                        "encrypt only the direct runs; --tls sets 'require' (env SSLMODE)")
    p.add_argument("--tls", action="store_true", default=env_bool("TLS"),
                   help="clients connect over TLS (sslmode=require) to every target: the proxy "
                        "([tls] mode = require) and pgbouncer (client_tls_sslmode = require) serve "
                        "one certificate made for the run with openssl, PostgreSQL its own "
                        "(needs ssl = on); upstream stays plain text for both (env TLS=1)")
    p.add_argument("--json", default=env("JSON", ""), metavar="FILE",
                   help="also write results as JSON to FILE (env JSON)")
    p.add_argument("--keep-db", action="store_true", default=env_bool("KEEP_DB"),
                   help="do not drop the database at exit (env KEEP_DB=1)")
    p.add_argument("--reuse-db", action="store_true", default=env_bool("REUSE_DB"),
                   help="skip drop+create+pgbench -i if the database exists with the "
                        "same scale (env REUSE_DB=1; useful with KEEP_DB=1 when iterating)")
    p.add_argument("--keep-tmp", action="store_true", default=env_bool("KEEP_TMP"),
                   help="keep the temporary directory (configs, logs) (env KEEP_TMP=1)")
    a = p.parse_args()

    for name in ("duration", "rounds", "clients", "threads", "scale"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if a.rounds > 100 or a.duration > 3600:
        p.error("refusing more than 100 rounds or runs longer than 3600 s")

    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for t in a.targets:
        if t not in ALL_TARGETS:
            p.error(f"unknown target {t!r}; choose from {','.join(ALL_TARGETS)}")
    if not a.targets:
        p.error("no targets")

    if a.tls:
        a.sslmode = "require"
    if not a.modes:
        a.modes = TLS_DEFAULT_MODES if a.tls else DEFAULT_MODES
    a.mode_list = []
    sep = ";" if "=" in a.modes else ","
    for item in a.modes.split(sep):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            name, flags = item.split("=", 1)
            a.mode_list.append((name.strip(), flags.split()))
        elif item in BUILTIN_MODES:
            a.mode_list.append((item, BUILTIN_MODES[item]))
        else:
            p.error(f"unknown mode {item!r}; builtin: {', '.join(BUILTIN_MODES)}")
    if not a.mode_list:
        p.error("no modes")

    # pgbench requires clients to be a multiple of threads
    t = max(1, min(a.threads, a.clients))
    while a.clients % t:
        t -= 1
    a.threads = t
    return a


# --------------------------------------------------------------------------
# process helpers


class Proc:
    """A background server we started (pgbouncer or the proxy)."""

    def __init__(self, name, popen, logfile):
        self.name = name
        self.popen = popen
        self.logfile = logfile

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def stop(self):
        if self.popen.poll() is not None:
            return
        try:
            self.popen.send_signal(signal.SIGINT if self.name == "pgbouncer" else signal.SIGTERM)
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            warn(f"{self.name} (pid {self.pid}) did not stop within 10 s; killing it")
            self.popen.kill()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                warn(f"{self.name} (pid {self.pid}) still running after SIGKILL")
        except ProcessLookupError:
            pass

    def log_tail(self, n=20):
        try:
            lines = Path(self.logfile).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in lines[-n:]) or "    (empty log)"


def cpu_seconds(pid):
    """utime+stime of a whole process (all threads), in seconds; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces/parens: split after the last ')'
    rest = data[data.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); fields 14,15 are rest[11], rest[12]
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def pg_env():
    e = dict(os.environ)
    for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGSERVICE", "PGOPTIONS", "PGSSLMODE"):
        e.pop(k, None)
    e["PGUSER"] = PG_USER
    e["PGSSLMODE"] = SSLMODE
    e["PGCONNECT_TIMEOUT"] = "10"
    e["PGAPPNAME"] = "switchyard-bench"
    return e


def psql(port, sql, db="postgres", timeout=60):
    """Run SQL via psql; returns (ok, output)."""
    cmd = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
           "-h", HOST, "-p", str(port), "-U", PG_USER, "-d", db, "-c", sql]
    try:
        r = subprocess.run(cmd, env=pg_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"psql timed out after {timeout} s"
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def wait_ready(proc, port, timeout_s):
    """Bounded wait until `port` accepts TCP and answers SELECT 1 for DB_NAME.
    Returns None when ready, else an error string."""
    deadline = time.monotonic() + timeout_s
    last = "never accepted a TCP connection"
    for _ in range(int(timeout_s / 0.25) + 1):
        if proc is not None and not proc.alive():
            return f"exited with status {proc.popen.returncode} during startup"
        if port_open(port):
            ok, out = psql(port, "SELECT 1", db=DB_NAME, timeout=10)
            if ok and out.strip() == "1":
                return None
            last = f"accepts TCP but 'SELECT 1' failed: {out[-300:]}"
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return f"not ready after {timeout_s} s ({last})"


# --------------------------------------------------------------------------
# setup


def find_pgbouncer():
    for c in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if c and os.access(c, os.X_OK):
            return c
    return None


def ensure_pgbouncer():
    exe = find_pgbouncer()
    if exe:
        return exe, None
    log("pgbouncer not found; installing it with apt-get ...")
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        return None, "pgbouncer missing and not root (and no sudo) to apt-get install it"
    e = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd, t in ((prefix + ["apt-get", "update"], 600),
                   (prefix + ["apt-get", "install", "-y", "--no-install-recommends", "pgbouncer"], 900)):
        try:
            r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=t)
        except subprocess.TimeoutExpired:
            return None, f"'{' '.join(cmd)}' timed out after {t} s"
        if r.returncode != 0:
            return None, f"'{' '.join(cmd)}' failed:\n{(r.stdout + r.stderr)[-1500:]}"
    exe = find_pgbouncer()
    return (exe, None) if exe else (None, "apt-get install finished but no pgbouncer binary found")


def tool_version(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def setup_database(a):
    if a.reuse_db:
        ok, out = psql(a.pg_port, "SELECT count(*) FROM pgbench_branches", db=DB_NAME)
        if ok and out.strip() == str(a.scale):
            log(f"reusing existing database {DB_NAME} (scale {a.scale})")
            return
        log(f"cannot reuse {DB_NAME} (missing or different scale); recreating it")
    log(f"creating database {DB_NAME} and running pgbench -i -s {a.scale} ...")
    ok, out = psql(a.pg_port, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    if not ok:
        raise SetupError(f"DROP DATABASE failed: {out}")
    ok, out = psql(a.pg_port, f"CREATE DATABASE {DB_NAME}")
    if not ok:
        raise SetupError(f"CREATE DATABASE failed: {out}")
    cmd = ["pgbench", "-h", HOST, "-p", str(a.pg_port), "-U", PG_USER,
           "-i", "-q", "-s", str(a.scale), DB_NAME]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, env=pg_env(), capture_output=True, text=True,
                           timeout=300 + 60 * a.scale)
    except subprocess.TimeoutExpired:
        raise SetupError("pgbench -i timed out")
    if r.returncode != 0:
        raise SetupError(f"pgbench -i failed:\n{r.stdout}{r.stderr}")
    log(f"  initialised in {time.monotonic() - t0:.1f} s")


class SetupError(Exception):
    pass


def make_certificate(workdir):
    """A CA and a server certificate for 127.0.0.1 signed by it (P-256 keys), made with the
    openssl command; returns (cert, key) paths. Both the proxy and pgbouncer serve them."""
    d = workdir / "tls"
    d.mkdir()
    steps = [
        ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=switchyard-bench-ca"],
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={HOST}"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "server.ext"],
    ]
    (d / "server.ext").write_text(f"subjectAltName=IP:{HOST}\n")
    for args in steps:
        try:
            r = subprocess.run(["openssl"] + args, cwd=str(d), capture_output=True, text=True, timeout=60)
        except OSError as e:
            raise SetupError(f"--tls needs the openssl command: {e}")
        if r.returncode != 0:
            raise SetupError(f"openssl {' '.join(args)} failed:\n{r.stderr[-1000:]}")
    return d / "server.pem", d / "server.key"


def pgbouncer_user():
    """The user pgbouncer runs as when we are root (it refuses root)."""
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return pwd.getpwnam("nobody")


def start_pgbouncer(a, workdir, exe):
    d = workdir / "pgbouncer"
    d.mkdir()
    auth = d / "userlist.txt"
    auth.write_text('"postgres" ""\n')
    tls = ""
    if a.tls:
        # The key stays private: readable by the user pgbouncer runs as only.
        if os.geteuid() == 0:
            pw = pgbouncer_user()
            os.chown(a.tls_key, pw.pw_uid, pw.pw_gid)
        os.chmod(a.tls_key, 0o600)
        os.chmod(a.tls_key.parent, 0o755)
        tls = (f"client_tls_sslmode = require\nclient_tls_cert_file = {a.tls_cert}\n"
               f"client_tls_key_file = {a.tls_key}\n")
    ini = d / "pgbouncer.ini"
    ini.write_text(f"""\
[databases]
{DB_NAME} = host={HOST} port={a.pg_port} dbname={DB_NAME}

[pgbouncer]
listen_addr = {HOST}
listen_port = {a.pgbouncer_port}
unix_socket_dir =
auth_type = trust
auth_file = {auth}
pool_mode = session
max_client_conn = 200
default_pool_size = 50
ignore_startup_parameters = extra_float_digits,options
log_connections = 0
log_disconnections = 0
; upstream in plain text, as the proxy's (its URL says sslmode=disable)
server_tls_sslmode = disable
{tls}""")
    for f in (d, auth, ini):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
    os.chmod(workdir, 0o755)
    kwargs = {}
    if os.geteuid() == 0:
        # pgbouncer refuses to run as root; same effect as `runuser -u postgres --`,
        # but the Popen pid is pgbouncer itself (needed for /proc/PID/stat).
        pw = pgbouncer_user()
        kwargs = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    logfile = d / "pgbouncer.log"
    with open(logfile, "w") as lf:
        popen = subprocess.Popen([exe, str(ini)], stdin=subprocess.DEVNULL, stdout=lf,
                                 stderr=subprocess.STDOUT, cwd=str(d), **kwargs)
    return Proc("pgbouncer", popen, logfile)


def ensure_proxy_binary(a):
    binp = Path(a.proxy_bin)
    if binp.is_file() and os.access(binp, os.X_OK):
        return str(binp), None
    if a.no_build:
        return None, f"{binp} does not exist (and --no-build / NO_BUILD=1 given)"
    if not shutil.which("cargo"):
        return None, f"{binp} does not exist and cargo is not installed"
    log(f"{binp} missing: running 'cargo build --release' in {REPO_ROOT} (timeout {a.build_timeout} s) ...")
    t0 = time.monotonic()
    try:
        r = subprocess.run(["cargo", "build", "--release"], cwd=str(REPO_ROOT),
                           capture_output=True, text=True, timeout=a.build_timeout)
    except subprocess.TimeoutExpired:
        return None, f"cargo build --release timed out after {a.build_timeout} s"
    if r.returncode != 0:
        return None, "cargo build --release failed:\n" + r.stderr[-2000:]
    log(f"  built in {time.monotonic() - t0:.0f} s")
    if binp.is_file():
        return str(binp), None
    return None, f"cargo build --release succeeded but {binp} does not exist"


def start_proxy(a, workdir, binp):
    d = workdir / "proxy"
    d.mkdir()
    if a.proxy_config:
        cfg = Path(a.proxy_config).resolve()
    else:
        cfg = d / "switchyard.toml"
        url = f"postgres://{PG_USER}@{HOST}:{a.pg_port}/{DB_NAME}"
        # Upstream in plain text as pgbouncer's: an absent sslmode is `prefer`, and with the
        # server's ssl = on the proxy alone would pay for TLS toward PostgreSQL.
        plain = "?sslmode=disable"
        tls = ""
        if a.tls:
            tls = f'[tls]\nmode = "require"\ncert_file = "{a.tls_cert}"\nkey_file = "{a.tls_key}"\n'
        cfg.write_text(f"""\
[proxy]
listen = "{HOST}:{a.proxy_port}"
worker_threads = {a.proxy_workers}
admin_listen = "{HOST}:{a.admin_port}"

[old]
url = "{url}{plain}"

[new]
# Passthrough never writes to NEW; it must differ from OLD and is only health-checked.
url = "{url}_new{plain}"

[auth]
method = "trust"

[telemetry]
log_level = "warn"
{tls}""")
    logfile = d / "switchyard.log"
    with open(logfile, "w") as lf:
        cmd = shlex.split(a.proxy_wrapper) + [binp, "proxy", "--config", str(cfg)]
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                 stdout=lf, stderr=subprocess.STDOUT, cwd=str(d))
    return Proc("proxy", popen, logfile), cfg


# --------------------------------------------------------------------------
# pgbench runs

# With -C (a connection per transaction) pgbench counts the connections in its tps.
RE_TPS = re.compile(r"^tps = ([0-9.]+) \((?:without initial connection time|including reconnection times)\)", re.M)
RE_CONN = re.compile(r"^average connection time = ([0-9.]+) ms", re.M)
RE_LAT = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
RE_TXN = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
RE_FAIL = re.compile(r"^number of failed transactions: (\d+)", re.M)


def run_pgbench(a, port, flags, duration):
    cmd = ["pgbench", "-h", HOST, "-p", str(port), "-U", PG_USER, "-n",
           "-c", str(a.clients), "-j", str(a.threads), "-T", str(duration)] + flags + [DB_NAME]
    res = {"cmd": " ".join(cmd), "ok": False}
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, env=pg_env(), capture_output=True, text=True,
                           timeout=duration + 60)
    except subprocess.TimeoutExpired:
        res["error"] = f"pgbench did not finish within {duration + 60} s"
        return res
    res["wall_s"] = round(time.monotonic() - t0, 3)
    out = r.stdout + r.stderr
    tps, lat, txn, fail = (RE_TPS.search(out), RE_LAT.search(out),
                           RE_TXN.search(out), RE_FAIL.search(out))
    if r.returncode != 0 or not tps or not txn:
        res["error"] = f"pgbench exit {r.returncode}: " + out.strip()[-600:]
        return res
    conn = RE_CONN.search(out)
    res.update(ok=True, tps=float(tps.group(1)), txns=int(txn.group(1)),
               latency_ms=float(lat.group(1)) if lat else None,
               connect_ms=float(conn.group(1)) if conn else None,
               failed=int(fail.group(1)) if fail else 0)
    if res["txns"] == 0:
        res.update(ok=False, error="pgbench processed 0 transactions")
    return res


# --------------------------------------------------------------------------
# main


def main():
    global SSLMODE
    a = parse_args()
    # With --tls the setup talks to PostgreSQL with libpq's default, and the runs require TLS.
    SSLMODE = "prefer" if a.tls else a.sslmode
    started = time.time()
    ports = {"direct": a.pg_port, "proxy": a.proxy_port, "pgbouncer": a.pgbouncer_port}
    procs = {}  # target -> Proc
    unavailable = {}  # target -> reason
    workdir = Path(tempfile.mkdtemp(prefix="switchyard-bench-"))
    db_created = False

    def cleanup():
        for p in procs.values():
            p.stop()
        if db_created and not a.keep_db:
            ok, out = psql(a.pg_port, f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
            if not ok:
                warn(f"could not drop {DB_NAME}: {out}")
        if a.keep_tmp or ("proxy" in unavailable and "proxy" in procs):
            log(f"(configs and logs kept in {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    atexit.register(cleanup)

    def on_signal(signum, _frame):
        print(f"caught signal {signum}; cleaning up", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    for tool in ("pgbench", "psql"):
        if not shutil.which(tool):
            raise SetupError(f"{tool} not found in PATH")

    ok, out = psql(a.pg_port, "SHOW server_version")
    if not ok:
        raise SetupError(f"PostgreSQL not reachable at {HOST}:{a.pg_port}: {out}")
    pg_version = out.strip()

    info = {
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "postgres": pg_version, "pgbench": tool_version(["pgbench", "--version"]),
    }
    if a.tls:
        a.tls_cert, a.tls_key = make_certificate(workdir)
        info["tls_certificate"] = "P-256 ECDSA, one for the proxy and pgbouncer"
        ok, out = psql(a.pg_port, "SHOW ssl")
        if "direct" in a.targets and not (ok and out.strip() == "on"):
            unavailable["direct"] = f"PostgreSQL has ssl = {out.strip()!r}: no TLS to compare with"

    # ---- prerequisites that may take a while, before creating the DB
    pgb_exe = proxy_bin = None
    if "pgbouncer" in a.targets:
        pgb_exe, err = ensure_pgbouncer()
        if err:
            unavailable["pgbouncer"] = err
        else:
            info["pgbouncer"] = tool_version([pgb_exe, "--version"])
    if "proxy" in a.targets:
        proxy_bin, err = ensure_proxy_binary(a)
        if err:
            unavailable["proxy"] = err
        else:
            st = os.stat(proxy_bin)
            info["proxy_bin"] = proxy_bin
            info["proxy_bin_mtime"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
    try:
        info["git_rev"] = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["git_rev"] = None

    for tgt, port in (("proxy", a.proxy_port), ("proxy", a.admin_port), ("pgbouncer", a.pgbouncer_port)):
        if tgt in a.targets and tgt not in unavailable and port_open(port):
            unavailable[tgt] = (f"port {HOST}:{port} is already in use before we started anything "
                                f"(stale {tgt}?); refusing to benchmark an unknown server")

    db_created = True  # from here on, drop it at exit (unless KEEP_DB=1)
    setup_database(a)
    SSLMODE = a.sslmode

    # ---- start servers
    if "pgbouncer" in a.targets and "pgbouncer" not in unavailable:
        p = start_pgbouncer(a, workdir, pgb_exe)
        procs["pgbouncer"] = p
        err = wait_ready(p, a.pgbouncer_port, a.start_timeout)
        if err:
            unavailable["pgbouncer"] = f"pgbouncer {err}\n{p.log_tail()}"
            p.stop()
        else:
            log(f"pgbouncer ready on {HOST}:{a.pgbouncer_port} (pid {p.pid})")
    if "proxy" in a.targets and "proxy" not in unavailable:
        p, cfg = start_proxy(a, workdir, proxy_bin)
        procs["proxy"] = p
        info["proxy_config"] = str(cfg)
        err = wait_ready(p, a.proxy_port, a.start_timeout)
        if err:
            unavailable["proxy"] = f"{proxy_bin} proxy --config {cfg}: {err}\n{p.log_tail()}"
            p.stop()
        else:
            log(f"switchyard proxy ready on {HOST}:{a.proxy_port} (pid {p.pid})")

    if a.tls:
        # What each target's TLS session is, as psql reports it (readiness already required TLS).
        for t in a.targets:
            if t not in unavailable:
                ok, out = psql(ports[t], "\\conninfo", db=DB_NAME)
                found = re.search(r"SSL connection \(([^)]*)\)", out)
                info[f"tls_{t}"] = found.group(1) if ok and found else f"not TLS? {out[-200:]}"
                log(f"{t:<9} over TLS: {info[f'tls_{t}']}")

    for t, why in unavailable.items():
        warn(f"{t} UNAVAILABLE, its column will show n/a: {why}")

    active = [t for t in a.targets if t not in unavailable]
    est = len(a.mode_list) * (a.rounds * len(active) * a.duration
                              + (len(active) * a.warmup if a.warmup else 0))
    log(f"\nclients={a.clients} threads={a.threads} duration={a.duration}s rounds={a.rounds} "
        f"scale={a.scale} targets={','.join(active) or 'none'}  (~{est} s of pgbench)")

    runs = []  # flat list of run records
    summaries = []
    run_failures = 0

    def check_alive(t):
        p = procs.get(t)
        if p is not None and t not in unavailable and not p.alive():
            unavailable[t] = f"{t} process exited (status {p.popen.returncode}) mid-benchmark\n{p.log_tail()}"
            warn(unavailable[t])

    for mode_name, flags in a.mode_list:
        log(f"\n== mode {mode_name}: pgbench {' '.join(flags)} ==")
        if a.warmup:
            for t in active:
                check_alive(t)
                if t in unavailable:
                    continue
                r = run_pgbench(a, ports[t], flags, a.warmup)
                if not r["ok"]:
                    warn(f"warm-up against {t} failed: {r.get('error')}")
        for rnd in range(a.rounds):
            k = rnd % len(active) if active else 0
            order = active[k:] + active[:k]  # rotate the order each round
            for t in order:
                check_alive(t)
                if t in unavailable:
                    continue
                pid = procs[t].pid if t in procs else None
                c0 = cpu_seconds(pid) if pid else None
                r = run_pgbench(a, ports[t], flags, a.duration)
                c1 = cpu_seconds(pid) if pid else None
                r.update(mode=mode_name, round=rnd + 1, target=t)
                if c0 is not None and c1 is not None:
                    r["cpu_s"] = round(c1 - c0, 3)
                    if r["ok"]:
                        r["cpu_us_per_txn"] = (c1 - c0) / r["txns"] * 1e6
                runs.append(r)
                if r["ok"]:
                    cpu = ""
                    if "cpu_us_per_txn" in r:
                        cpu = f"  {t} cpu={r['cpu_s']:.2f}s ({r['cpu_us_per_txn']:.1f} us/txn)"
                    failed = f"  FAILED_TXNS={r['failed']}" if r.get("failed") else ""
                    conn = f"  conn={r['connect_ms']:.3f} ms" if r.get("connect_ms") is not None else ""
                    log(f"  round {rnd + 1}/{a.rounds} {t:<9} tps={r['tps']:>10.1f}  "
                        f"lat={fmt(r['latency_ms'], '.3f')} ms{conn}  txns={r['txns']}{cpu}{failed}")
                else:
                    run_failures += 1
                    log(f"  round {rnd + 1}/{a.rounds} {t:<9} FAILED: {r.get('error')}")
                    check_alive(t)

        # ---- summary for this mode
        s = {"mode": mode_name, "flags": " ".join(flags), "targets": {}}
        for t in ALL_TARGETS:
            ok_runs = [r for r in runs if r["mode"] == mode_name and r["target"] == t and r["ok"]]
            tps = [r["tps"] for r in ok_runs]
            s["targets"][t] = {
                "runs": len(ok_runs),
                "tps_median": median_or_none(tps),
                "tps_min": min(tps) if tps else None,
                "tps_max": max(tps) if tps else None,
                "latency_ms_median": median_or_none([r["latency_ms"] for r in ok_runs]),
                "cpu_us_per_txn_median": median_or_none([r.get("cpu_us_per_txn") for r in ok_runs]),
                "connect_ms_median": median_or_none([r.get("connect_ms") for r in ok_runs]),
            }
        T = s["targets"]
        d, p, b = (T[x]["tps_median"] for x in ALL_TARGETS)
        s["proxy_vs_direct"] = ratio(p, d)
        s["proxy_vs_pgbouncer"] = ratio(p, b)
        s["pgbouncer_vs_direct"] = ratio(b, d)

        # paired (same-round) ratios: less sensitive to drift across the mode
        def paired(x, y):
            vals = []
            for rnd in range(1, a.rounds + 1):
                rx = [r for r in runs if r["mode"] == mode_name and r["round"] == rnd
                      and r["target"] == x and r["ok"]]
                ry = [r for r in runs if r["mode"] == mode_name and r["round"] == rnd
                      and r["target"] == y and r["ok"]]
                if rx and ry:
                    vals.append(rx[0]["tps"] / ry[0]["tps"])
            return median_or_none(vals)

        s["paired_proxy_vs_direct"] = paired("proxy", "direct")
        s["paired_proxy_vs_pgbouncer"] = paired("proxy", "pgbouncer")
        s["paired_pgbouncer_vs_direct"] = paired("pgbouncer", "direct")
        summaries.append(s)

    # ---- report
    log("\n" + "=" * 78)
    log(f"Switchyard system benchmark: {info['cpus']} CPUs, {info['postgres'].split()[0]}, "
        f"c={a.clients} j={a.threads} T={a.duration}s rounds={a.rounds} scale={a.scale}")
    for t, why in unavailable.items():
        log(f"NOTE: {t} = n/a: {why.splitlines()[0]}")
    for s in summaries:
        T = s["targets"]
        log(f"\n-- {s['mode']} (pgbench {s['flags']}{', over TLS' if a.tls else ''}) --")
        # With -C, each transaction is a connection: 'conn ms' is pgbench's average
        # connection time, and cpu us/txn the server's CPU per connection.
        with_conn = any(T[t]["connect_ms_median"] is not None for t in ALL_TARGETS)
        conn_head = f" {'conn ms':>8}" if with_conn else ""
        log(f"{'target':<10} {'median tps':>11} {'min':>10} {'max':>10} {'lat ms':>8}{conn_head} {'cpu us/txn':>11} runs")
        for t in ALL_TARGETS:
            if t not in a.targets:
                continue
            x = T[t]
            if x["runs"] == 0:
                why = unavailable.get(t, "all runs failed").splitlines()[0]
                log(f"{t:<10} {'n/a':>11}   ({why if len(why) <= 64 else why[:61] + '...'})")
                continue
            cpu = fmt(x["cpu_us_per_txn_median"]) if t != "direct" else "-"
            conn = f" {fmt(x['connect_ms_median'], '.3f'):>8}" if with_conn else ""
            log(f"{t:<10} {x['tps_median']:>11.1f} {x['tps_min']:>10.1f} {x['tps_max']:>10.1f} "
                f"{fmt(x['latency_ms_median'], '.3f'):>8}{conn} {cpu:>11} {x['runs']}/{a.rounds}")
        log(f"ratios (of medians): proxy/direct={fmt(s['proxy_vs_direct'], '.3f')} "
            f"proxy/pgbouncer={fmt(s['proxy_vs_pgbouncer'], '.3f')} "
            f"pgbouncer/direct={fmt(s['pgbouncer_vs_direct'], '.3f')}")
        log(f"ratios (same-round, median): proxy/direct={fmt(s['paired_proxy_vs_direct'], '.3f')} "
            f"proxy/pgbouncer={fmt(s['paired_proxy_vs_pgbouncer'], '.3f')} "
            f"pgbouncer/direct={fmt(s['paired_pgbouncer_vs_direct'], '.3f')}")
    log("")
    for s in summaries:
        T = s["targets"]
        conn = "".join(f"{t}_connect_ms={fmt(T[t]['connect_ms_median'], '.3f')} "
                       for t in ALL_TARGETS if T[t]["connect_ms_median"] is not None)
        log(f"RESULT mode={s['mode']} tls={'on' if a.tls else 'off'} {conn}direct_tps={fmt(T['direct']['tps_median'])} "
            f"proxy_tps={fmt(T['proxy']['tps_median'])} pgbouncer_tps={fmt(T['pgbouncer']['tps_median'])} "
            f"proxy_vs_direct={fmt(s['proxy_vs_direct'], '.3f')} "
            f"proxy_vs_pgbouncer={fmt(s['proxy_vs_pgbouncer'], '.3f')} "
            f"proxy_cpu_us_per_txn={fmt(T['proxy']['cpu_us_per_txn_median'])} "
            f"pgbouncer_cpu_us_per_txn={fmt(T['pgbouncer']['cpu_us_per_txn_median'])} "
            f"pgbouncer_vs_direct={fmt(s['pgbouncer_vs_direct'], '.3f')}")

    status = 0
    missing = [t for t in a.targets if t in unavailable]
    if missing:
        status = 1
        log(f"\nFAIL: target(s) unavailable: {', '.join(missing)} (see NOTE/WARNING above)")
    if run_failures:
        status = 1
        log(f"FAIL: {run_failures} pgbench run(s) failed")
    failed_txns = sum(r.get("failed", 0) for r in runs if r["ok"])
    if failed_txns:
        status = 1
        log(f"FAIL: {failed_txns} failed transaction(s) reported by pgbench")

    if a.json:
        doc = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "elapsed_s": round(time.time() - started, 1),
            "params": {"duration_s": a.duration, "rounds": a.rounds, "clients": a.clients,
                       "threads": a.threads, "scale": a.scale, "warmup_s": a.warmup,
                       "sslmode": a.sslmode, "tls": a.tls,
                       "targets": a.targets, "ports": ports, "admin_port": a.admin_port},
            "env": info,
            "unavailable": unavailable,
            "summary": summaries,
            "runs": runs,
            "exit_status": status,
        }
        Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"JSON written to {a.json}")
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SetupError as e:
        print(f"SETUP FAILED: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
