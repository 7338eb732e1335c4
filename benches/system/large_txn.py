#!/usr/bin/env python3
"""Large-transaction benchmark: one UPDATE of N rows direct vs through Switchyard in dual_write.

OLD (database switchyard_lt_old) and NEW (switchyard_lt_new) are two databases of the local
server (127.0.0.1:PG_PORT). Both get table public.lt with the same N rows, `switchyard prepare`
and a proxy with the table in dual_write (worker_threads = PROXY_WORKERS). Each round runs
`UPDATE lt SET v = v + 1` (one statement, autocommit, N rows) once directly on OLD and once
through the proxy, with VACUUM and CHECKPOINT before each, and prints both times, their ratio,
the proxy's peak RSS (VmHWM of /proc/PID/status) and, from the proxy's log, how the transaction
was mirrored (images, chunks, intent size). At the end it waits for the intents to be gone and
compares OLD and NEW in full (md5 of every row). Exit status: 0; 1 if OLD and NEW differ or a
run failed; 2 if the setup failed.

Standard library only. Options (flags or environment): see --help and benches/system/README.md,
section "Large-transaction benchmark". Loopback only.
"""

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pglocal import HOST, USER, env, fmt, log, median_or_none as med, pg_env, port_open, psql, ratio, run

OLD_DB = "switchyard_lt_old"
NEW_DB = "switchyard_lt_new"
REPO = Path(__file__).resolve().parents[2]
UPDATE = "UPDATE lt SET v = v + 1"
# Directly, OLD's capture triggers stay quiet (as before the migration): otherwise their net would
# record every row for the repair loop, which would then run during the proxy's measurement.
DIRECT = "SET session_replication_role = replica; " + UPDATE


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=int(env("ROWS", "1000000")), help="rows updated (env ROWS)")
    p.add_argument("--rounds", type=int, default=int(env("ROUNDS", "1")), help="direct+proxy pairs (env ROUNDS)")
    p.add_argument("--pg-port", type=int, default=int(env("PG_PORT", "5432")), help="PostgreSQL port (env PG_PORT)")
    p.add_argument("--proxy-port", type=int, default=int(env("PROXY_PORT", "6552")), help="env PROXY_PORT")
    p.add_argument("--admin-port", type=int, default=int(env("ADMIN_PORT", "6593")), help="env ADMIN_PORT")
    p.add_argument("--proxy-workers", type=int, default=int(env("PROXY_WORKERS", "1")),
                   help="proxy worker_threads (env PROXY_WORKERS)")
    p.add_argument("--timeout-ms", type=int, default=int(env("MIRROR_TIMEOUT_MS", "2000")),
                   help="[mirror] timeout_ms (env MIRROR_TIMEOUT_MS)")
    p.add_argument("--bin", default=env("SWITCHYARD_BIN", str(REPO / "target/release/switchyard")),
                   help="Switchyard binary (env SWITCHYARD_BIN)")
    p.add_argument("--statement-timeout", type=int, default=int(env("STATEMENT_TIMEOUT", "3600")),
                   help="seconds allowed per UPDATE (env STATEMENT_TIMEOUT)")
    p.add_argument("--keep-db", action="store_true", default=env("KEEP_DB", "") not in ("", "0"),
                   help="keep both databases (env KEEP_DB=1)")
    a = p.parse_args()
    if a.rows < 1 or a.rounds < 1:
        p.error("--rows and --rounds must be >= 1")
    return a


def timed(port, db, sql, limit):
    t0 = time.monotonic()
    psql(port, db, sql, limit)
    return time.monotonic() - t0


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def prepare_round(a):
    for db in (OLD_DB, NEW_DB):
        psql(a.pg_port, db, "VACUUM (FREEZE, ANALYZE) lt", 3600)
    psql(a.pg_port, "postgres", "CHECKPOINT", 3600)


def main():
    a = parse_args()
    if not Path(a.bin).exists():
        raise SystemExit(f"{a.bin} missing: cargo build --release (or set SWITCHYARD_BIN)")
    for port in (a.proxy_port, a.admin_port):
        if port_open(port):
            print(f"port {port} is in use", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="switchyard-lt-"))
    proxy = None
    status = 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        fill = (f"CREATE TABLE lt (id bigint PRIMARY KEY, v bigint NOT NULL, filler text NOT NULL); "
                f"INSERT INTO lt SELECT i, 0, repeat('x', 84) FROM generate_series(1, {a.rows}) i")
        for db in (OLD_DB, NEW_DB):
            psql(a.pg_port, "postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)", 120)
            psql(a.pg_port, "postgres", f"CREATE DATABASE {db}", 120)
            psql(a.pg_port, db, fill, 3600)
        cfg = work / "proxy.toml"
        cfg.write_text(f"""[proxy]
listen = "{HOST}:{a.proxy_port}"
admin_listen = "{HOST}:{a.admin_port}"
worker_threads = {a.proxy_workers}
[old]
url = "postgres://{USER}@{HOST}:{a.pg_port}/{OLD_DB}"
[new]
url = "postgres://{USER}@{HOST}:{a.pg_port}/{NEW_DB}"
[auth]
method = "trust"
[telemetry]
log_level = "warn,switchyard_dualwrite=info"
[mirror]
timeout_ms = {a.timeout_ms}

[[tables]]
name = "public.lt"
phase = "dual_write"
""")
        run([a.bin, "prepare", "--config", str(cfg)], timeout=600)
        logfile = work / "proxy.log"
        with open(logfile, "w") as lf:
            proxy = subprocess.Popen([a.bin, "proxy", "--config", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(240):
            if subprocess.run(["psql", "-X", "-h", HOST, "-p", str(a.proxy_port), "-U", USER, "-d", OLD_DB,
                               "-c", "SELECT 1"], env=pg_env(), capture_output=True).returncode == 0:
                break
            if proxy.poll() is not None:
                raise SystemExit(f"proxy exited:\n{logfile.read_text()[-2000:]}")
            time.sleep(0.25)
        rss_start = status_kb(proxy.pid, "VmRSS")
        log(f"rows={a.rows} rounds={a.rounds} proxy pid {proxy.pid} (worker_threads={a.proxy_workers}), "
            f"RSS at start {rss_start / 1024:.1f} MiB")
        direct, proxied = [], []
        limit = a.statement_timeout + 60
        for rnd in range(a.rounds):
            # the order alternates, so drift spreads over both
            for target in (("direct", "proxy") if rnd % 2 == 0 else ("proxy", "direct")):
                prepare_round(a)
                if target == "direct":
                    direct.append(timed(a.pg_port, OLD_DB, DIRECT, limit))
                else:
                    proxied.append(timed(a.proxy_port, OLD_DB, UPDATE, limit))
            log(f"  round {rnd + 1}/{a.rounds}: direct {direct[-1]:.2f} s, proxy {proxied[-1]:.2f} s, "
                f"ratio {proxied[-1] / direct[-1]:.2f}x")
        hwm = status_kb(proxy.pid, "VmHWM")
        if a.rounds % 2 == 0:  # the direct run came last: NEW lacks it; one more through the proxy
            psql(a.proxy_port, OLD_DB, UPDATE, limit)
        deadline = time.monotonic() + max(60, a.rows / 5000)
        while int(psql(a.pg_port, OLD_DB, "SELECT count(*) FROM switchyard.switchyard_intents", 60)) > 0:
            if time.monotonic() > deadline:
                log("WARNING: intents still pending")
                status = 1
                break
            time.sleep(0.5)
        q = "SELECT md5(string_agg(row_to_json(t)::text, E'\\n' ORDER BY id)) FROM lt t"
        same = psql(a.pg_port, OLD_DB, q, 3600) == psql(a.pg_port, NEW_DB, q, 3600)
        if not same:
            status = 1
        mirrored = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in logfile.read_text(errors="replace").splitlines()
                    if "large transaction" in line]
        for line in mirrored[-a.rounds:]:
            log("  proxy: " + line)
        d, p = med(direct), med(proxied)
        log(f"\ndirect {fmt(d, '.2f')} s, proxy {fmt(p, '.2f')} s (medians), ratio {fmt(ratio(p, d), '.2f')}x "
            f"(target <= 3x); proxy peak RSS {hwm / 1024:.1f} MiB (start {rss_start / 1024:.1f} MiB); "
            f"OLD and NEW {'identical' if same else 'DIFFERENT'}")
        intent = re.search(r"intent_bytes=(\d+)", mirrored[-1]) if mirrored else None
        log(f"RESULT rows={a.rows} direct_s={fmt(d, '.3f')} proxy_s={fmt(p, '.3f')} ratio={fmt(ratio(p, d), '.3f')} "
            f"peak_rss_mib={hwm / 1024:.1f} start_rss_mib={rss_start / 1024:.1f} "
            f"intent_bytes={intent.group(1) if intent else 'n/a'} converged={'yes' if same else 'no'}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if proxy is not None and proxy.poll() is None:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proxy.kill()
        if not a.keep_db:
            for db in (OLD_DB, NEW_DB):
                subprocess.run(["psql", "-X", "-q", "-h", HOST, "-p", str(a.pg_port), "-U", USER, "-d", "postgres",
                                "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], env=pg_env(),
                               capture_output=True, timeout=120)
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
