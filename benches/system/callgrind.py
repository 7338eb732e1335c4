#!/usr/bin/env python3
"""Instructions per transaction of the proxy (or pgbouncer), counted by callgrind.

Python 3 standard library only. See "Instructions per transaction" in
benches/system/README.md.

Wall-clock TPS and CPU time move with whatever else runs on the machine;
instruction counts do not. This starts the target under
`valgrind --tool=callgrind`, warms it up, then for two transaction counts
zeroes the counters (`callgrind_control -z`), runs
`pgbench -t` (a fixed number of transactions) and dumps them
(`callgrind_control -d`). The difference between the two dumps divided by the
difference in transactions is the cost of one transaction, without start-up
and connection set-up. Only user-space instructions are counted: syscalls are
the same for the proxy and pgbouncer (count them with `perf stat`, see the
README), so this is the part that differs.

Exit status: 0 measured; 1 the target failed or pgbench failed; 2 setup failed.
"""

import argparse
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
PG_USER = "postgres"
MODES = {
    "select-prepared": "-S -M prepared",
    "select-simple": "-S -M simple",
    "tpcb-prepared": "-M prepared",
    "tpcb-simple": "-M simple",
    "select-extended": "-S -M extended",
}


def env(name, default):
    return os.environ.get(name, default)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", choices=("proxy", "pgbouncer"), default=env("TARGET", "proxy"),
                   help="what to measure (env TARGET)")
    p.add_argument("--mode", default=env("MODE", "select-prepared"),
                   help="a pgbench.py mode name or pgbench flags, e.g. '-S -M prepared' (env MODE)")
    p.add_argument("--clients", type=int, default=int(env("CLIENTS", "8")),
                   help="pgbench -c; more clients batch more events per wake-up (env CLIENTS)")
    p.add_argument("--txns", type=int, default=int(env("TXNS", "6000")),
                   help="transactions in the larger of the two measured runs (env TXNS)")
    p.add_argument("--proxy-bin", default=env("SWITCHYARD_BIN", str(REPO_ROOT / "target/release/switchyard")),
                   help="Switchyard binary (env SWITCHYARD_BIN)")
    p.add_argument("--db", default=env("DB", "switchyard_callgrind"),
                   help="database, created with pgbench -i -s 1 if missing and kept (env DB)")
    p.add_argument("--pg-port", type=int, default=int(env("PG_PORT", "5432")), help="(env PG_PORT)")
    p.add_argument("--port", type=int, default=int(env("PORT", "6542")),
                   help="port the measured target listens on (env PORT)")
    p.add_argument("--out", default=env("OUT", ""),
                   help="keep the callgrind files in this directory (env OUT; default: a temp dir, removed)")
    a = p.parse_args()
    a.flags = shlex.split(MODES.get(a.mode, a.mode))
    if a.clients < 1 or a.txns < 6 * a.clients:
        p.error("need --clients >= 1 and --txns >= 6 * clients")
    return a


def pg_env():
    e = dict(os.environ, PGSSLMODE="disable", PGCONNECT_TIMEOUT="5")
    e.pop("PGPASSWORD", None)
    return e


def run(cmd, **kw):
    return subprocess.run(cmd, env=pg_env(), capture_output=True, text=True, **kw)


def psql(port, sql, db="postgres"):
    r = run(["psql", "-h", HOST, "-p", str(port), "-U", PG_USER, "-d", db, "-Atqc", sql], timeout=60)
    return r.returncode == 0, r.stdout.strip() or r.stderr.strip()


def ensure_db(a):
    ok, out = psql(a.pg_port, f"SELECT 1 FROM pg_database WHERE datname = '{a.db}'")
    if not ok:
        sys.exit(f"PostgreSQL on port {a.pg_port}: {out}")
    if out == "1":
        return
    ok, out = psql(a.pg_port, f"CREATE DATABASE {a.db}")
    r = run(["pgbench", "-h", HOST, "-p", str(a.pg_port), "-U", PG_USER, "-i", "-s", "1", "-q", a.db],
            timeout=600)
    if not ok or r.returncode != 0:
        sys.exit(f"cannot create {a.db}: {out} {r.stderr[-500:]}")


def start(a, work):
    """Starts the target under callgrind; returns (Popen, run-as user or None)."""
    # Uncompressed names, so each dump can be read by callgrind_annotate on its own.
    cg = ["valgrind", "--tool=callgrind", "--compress-strings=no", "--compress-pos=no",
          f"--callgrind-out-file={work}/cg.out.%p"]
    if a.target == "proxy":
        cfg = work / "switchyard.toml"
        url = f"postgres://{PG_USER}@{HOST}:{a.pg_port}/{a.db}"
        cfg.write_text(f'[proxy]\nlisten = "{HOST}:{a.port}"\nworker_threads = 1\n\n'
                       f'[old]\nurl = "{url}"\n\n[new]\nurl = "{url}_new"\n\n'
                       f'[auth]\nmethod = "trust"\n\n[telemetry]\nlog_level = "warn"\n')
        cmd, user = cg + [a.proxy_bin, "proxy", "--config", str(cfg)], None
    else:
        exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        (work / "userlist.txt").write_text('"postgres" ""\n')
        (work / "pgbouncer.ini").write_text(
            f"[databases]\n{a.db} = host={HOST} port={a.pg_port} dbname={a.db}\n\n"
            f"[pgbouncer]\nlisten_addr = {HOST}\nlisten_port = {a.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {work}/userlist.txt\npool_mode = session\n"
            "max_client_conn = 200\ndefault_pool_size = 50\n"
            "ignore_startup_parameters = extra_float_digits,options\n")
        cmd, user = cg + [exe, str(work / "pgbouncer.ini")], None
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            user = "postgres"
            os.chmod(work, 0o777)
    kwargs = {}
    if user:
        pw = pwd.getpwnam(user)
        # USER/LOGNAME name valgrind's control pipe, which callgrind_control looks up as `user`.
        kwargs = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                      env=dict(os.environ, USER=user, LOGNAME=user, HOME=pw.pw_dir))
    log = open(work / "target.log", "w")
    popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             cwd=str(work), **kwargs)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            sys.exit(f"{a.target} exited under valgrind; see {work}/target.log")
        if psql(a.port, "SELECT 1", db=a.db)[0]:
            return popen, user
        time.sleep(1)
    popen.kill()
    sys.exit(f"{a.target} did not accept connections within 120 s under valgrind")


def control(popen, user, flag):
    cmd = ["callgrind_control", flag, str(popen.pid)]
    if user:
        cmd = ["runuser", "-u", user, "--"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {r.stderr.strip()}")


def pgbench(a, txns):
    per_client = txns // a.clients
    threads = max(t for t in (1, 2) if a.clients % t == 0)
    r = run(["pgbench", "-h", HOST, "-p", str(a.port), "-U", PG_USER, "-n", "-c", str(a.clients),
             "-j", str(threads), "-t", str(per_client)] + a.flags + [a.db], timeout=3600)
    m = re.search(r"^number of transactions actually processed: (\d+)", r.stdout, re.M)
    if r.returncode != 0 or not m:
        sys.exit(f"pgbench failed: {(r.stdout + r.stderr)[-800:]}")
    return int(m.group(1))


def measure(a, popen, user, work, txns):
    """Instructions and transactions of one zeroed, pgbench'd and dumped interval."""
    before = set(work.glob("cg.out.*.*"))
    control(popen, user, "-z")
    done = pgbench(a, txns)
    control(popen, user, "-d")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(work.glob("cg.out.*.*")) - before
        totals = [re.search(r"^totals: (\d+)", f.read_text(errors="replace"), re.M) for f in new]
        if new and all(totals):
            return sum(int(t.group(1)) for t in totals), done
        time.sleep(0.5)
    sys.exit("callgrind dump did not appear")


def main():
    a = parse_args()
    for tool in ("valgrind", "callgrind_control", "pgbench", "psql"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    if a.target == "proxy" and not Path(a.proxy_bin).is_file():
        sys.exit(f"{a.proxy_bin} missing: cargo build --release")
    with socket.socket() as probe:
        if probe.connect_ex((HOST, a.port)) == 0:
            sys.exit(f"port {a.port} is already in use: pick another with --port")
    ensure_db(a)
    work = Path(a.out).resolve() if a.out else Path(tempfile.mkdtemp(prefix="switchyard-callgrind-"))
    work.mkdir(parents=True, exist_ok=True)
    popen, user = start(a, work)
    try:
        pgbench(a, 50 * a.clients)  # warm-up: caches, statement plans, buffers
        small_ir, small_n = measure(a, popen, user, work, a.txns // 6)
        big_ir, big_n = measure(a, popen, user, work, a.txns)
    finally:
        popen.send_signal(signal.SIGINT if a.target == "pgbouncer" else signal.SIGTERM)
        try:
            popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            popen.kill()
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)
    per_txn = (big_ir - small_ir) / (big_n - small_n)
    print(f"{a.target} {' '.join(a.flags)} -c {a.clients}: {small_n} txns {small_ir} Ir, "
          f"{big_n} txns {big_ir} Ir")
    print(f"RESULT target={a.target} mode={a.mode.replace(' ', '')} clients={a.clients} "
          f"instructions_per_txn={per_txn:.0f}")
    if a.out:
        print(f"callgrind files in {work}: callgrind_annotate --inclusive=yes --threshold=100 "
              f"{work}/cg.out.*.2")


if __name__ == "__main__":
    main()
