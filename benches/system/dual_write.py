#!/usr/bin/env python3
"""Dual-write benchmark: pgbench tpcb-like direct, through Switchyard in passthrough and in dual_write.

pgbench runs direct to OLD, through the proxy in passthrough and through the proxy in
dual_write, with OLD and NEW on separate PostgreSQL clusters.

OLD is database switchyard_dw_old on the local server (127.0.0.1:PG_PORT). NEW is database
switchyard_dw_new on a throwaway cluster of its own that this script creates (initdb as the
`postgres` OS user into a temporary directory, 127.0.0.1:NEW_PORT, settings copied from OLD's),
and stops and removes at exit (also on error, Ctrl-C, SIGTERM). Both get `pgbench -i -s SCALE`,
then `switchyard prepare`; two proxies start from the same binary: one with the four pgbench
tables in dual_write (PROXY_PORT), one with them in passthrough (PASSTHROUGH_PORT). Each round
runs pgbench once against every target (direct, passthrough, dual_write; the order rotates each
round), and each run measures TPS, p50/p99 latency (pgbench's per-transaction log) and the CPU
µs per committed transaction of OLD's cluster, NEW's cluster, the proxy, pgbench and the machine.
It prints a table and one `RESULT` line per mode with three ratios against their targets:
OLD's CPU dual_write/direct (<= 1.2x), the proxy's CPU dual_write/passthrough (<= 1.3x), and
the p50 latency dual_write adds over direct (<= 1 ms). A missed target is reported, not an
error. At the end it resynchronises NEW from OLD, runs the dual_write proxy alone and compares
every table in full; the exit status is 1 if OLD and NEW differ or a run broke, 2 if the setup
failed.

Standard library only. Options (flags or environment): see --help and
benches/system/README.md, section "Dual-write benchmark". Loopback only; every run bounded by
its duration.
"""

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pglocal import HOST, USER, env, fmt, log, median_or_none as med, pg_env, port_open, psql as _psql, ratio, run

OLD_DB = "switchyard_dw_old"
NEW_DB = "switchyard_dw_new"
REPO = Path(__file__).resolve().parents[2]
TABLES = ["pgbench_accounts", "pgbench_tellers", "pgbench_branches", "pgbench_history"]
TARGETS = ("direct", "passthrough", "dual_write")
# Targets: OLD's CPU per transaction in dual_write over direct; the proxy's CPU per transaction
# in dual_write over the same proxy in passthrough; p50 latency dual_write adds over direct (ms).
OLD_CPU_TARGET = 1.2
PROXY_CPU_TARGET = 1.3
ADDED_P50_TARGET_MS = 1.0
# OLD's settings that the throwaway NEW cluster copies, so that both do the same work per write.
COPIED_SETTINGS = ("shared_buffers", "fsync", "synchronous_commit", "full_page_writes", "wal_level",
                   "wal_buffers", "wal_compression", "max_wal_size", "min_wal_size", "checkpoint_timeout",
                   "checkpoint_completion_target", "autovacuum", "work_mem", "maintenance_work_mem",
                   "max_connections", "jit", "huge_pages")


def psql(port, db, sql, timeout=120):
    """psql on a local server; this script's statements are small, so it waits 2 minutes."""
    return _psql(port, db, sql, timeout)


def percentile(sorted_xs, p):
    if not sorted_xs:
        return None
    k = min(len(sorted_xs) - 1, max(0, int(round(p / 100.0 * (len(sorted_xs) - 1)))))
    return sorted_xs[k]


# --------------------------------------------------------------------------
# CPU accounting

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks():
    """pid -> (ppid, utime+stime, cutime+cstime) in clock ticks for every process (all threads),
    and the machine's busy ticks."""
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: fields after the last ')' start at field 3 (state)
        fields = st[st.rindex(")") + 2:].split()
        procs[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return procs, sum(v) - v[3] - v[4]


def postmaster_pid(port):
    """The postmaster of the server at `port`: the parent of its checkpointer (a backend of ours
    would be gone, with psql, before /proc could be read)."""
    pid = int(psql(port, "postgres", "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"))
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    return int(st[st.rindex(")") + 2:].split()[1])


def foreign_backends(port, ours):
    """pids of the server's client backends connected to databases other than `ours`: on a shared
    server (OLD) they are someone else's load, not part of this benchmark."""
    out = psql(port, "postgres", "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
                                 f"AND pid <> pg_backend_pid() AND datname IS DISTINCT FROM '{ours}'")
    return {int(x) for x in out.split()}


def cpu_split(before, after, groups, txns):
    """CPU µs per transaction by group between two cpu_ticks() samples. `groups` maps a group name
    to (pids, postmaster): a process belongs to the group if its pid is listed or its parent is
    the postmaster; a postmaster's group also gets the CPU of the children it reaped (cutime), so
    backends that exited in between are counted too. The rest is `other`."""
    (pa, ba), (pb, bb) = before, after
    owner = {}
    for g, (pids, pm) in groups.items():
        for pid in pids:
            owner[pid] = g
        if pm is not None:
            owner[pm] = g
    per = {g: 0 for g in groups}
    per["other"] = 0
    for pid, (ppid, t, ct) in pb.items():
        old = pa.get(pid)
        if old is not None and old[0] != ppid:
            old = None  # pid reused
        d = t - (old[1] if old else 0)
        g = owner.get(pid)
        if g is None:
            g = next((g for g, (_, pm) in groups.items() if pm is not None and ppid == pm), "other")
        if groups.get(g, (None, None))[1] == pid:
            d += ct - (old[2] if old else 0)  # children reaped by the postmaster meanwhile
        per[g] += max(d, 0)
    us = lambda ticks: round(ticks / CLK_TCK / max(txns, 1) * 1e6, 1)
    split = {g: us(t) for g, t in per.items()}
    split["machine busy"] = us(bb - ba)
    return split


# --------------------------------------------------------------------------
# the throwaway NEW cluster


class NewCluster:
    """A PostgreSQL cluster of our own: initdb into a temporary directory as the `postgres` OS
    user (initdb refuses root), pg_ctl start on 127.0.0.1:port, stop and remove at exit."""

    def __init__(self, bindir, port, settings, keep):
        self.bindir, self.port, self.settings, self.keep = bindir, port, settings, keep
        self.dir = Path(tempfile.mkdtemp(prefix="switchyard-dw-new-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "postgres.log"
        self.started = False
        self.as_user = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = (["runuser", "-u", "postgres", "--"] if shutil.which("runuser")
                            else ["su", "postgres", "-s", "/bin/sh", "-c", '"$0" "$@"'])

    def cmd(self, prog, *args):
        return self.as_user + [str(Path(self.bindir) / prog), *args]

    def start(self, locale):
        r = run(self.cmd("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                         f"--locale={locale}", "--no-sync"), timeout=300, check=False, cwd=str(self.dir))
        if r.returncode != 0:
            raise SetupError(f"initdb failed:\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
        opts = [f"-p {self.port}", f"-c listen_addresses={HOST}", f"-c unix_socket_directories='{self.dir}'",
                "-c ssl=off", "-c cluster_name=switchyard-dw-new"]
        opts += [f"-c {k}='{v}'" for k, v in self.settings.items()]
        self.started = True  # from here on, pg_ctl stop at exit
        r = run(self.cmd("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "120",
                         "-o", " ".join(opts), "start"), timeout=180, check=False, cwd=str(self.dir))
        if r.returncode != 0:
            raise SetupError(f"pg_ctl start failed:\n{r.stdout[-1000:]}{r.stderr[-1000:]}\n{self.log_tail()}")

    def log_tail(self, n=20):
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    def stop(self):
        if self.started:
            for mode in ("fast", "immediate"):
                r = subprocess.run(self.cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"),
                                   capture_output=True, text=True, timeout=120, cwd=str(self.dir))
                if r.returncode == 0 or not (self.data / "postmaster.pid").exists():
                    self.started = False
                    break
            if self.started:
                log(f"WARNING: could not stop NEW's cluster; left in {self.dir}")
                return
        if self.keep:
            log(f"(NEW's stopped cluster and logs kept in {self.dir})")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


class SetupError(Exception):
    pass


def find_bindir(a):
    if a.pg_bindir:
        return a.pg_bindir
    major = psql(a.pg_port, "postgres", "SELECT current_setting('server_version_num')::int / 10000")
    for d in (f"/usr/lib/postgresql/{major}/bin", os.path.dirname(shutil.which("pg_ctl") or "")):
        if d and os.access(os.path.join(d, "pg_ctl"), os.X_OK) and os.access(os.path.join(d, "initdb"), os.X_OK):
            return d
    raise SetupError("pg_ctl/initdb not found: set PG_BINDIR")


# --------------------------------------------------------------------------
# proxies


class Proxy:
    def __init__(self, name, a, work, phase, port, admin_port):
        self.name, self.a, self.port = name, a, port
        self.cfg = work / f"{name}.toml"
        tables = "".join(f'[[tables]]\nname = "public.{t}"\nphase = "{phase}"\n\n' for t in TABLES)
        self.cfg.write_text(f"""[proxy]
listen = "{HOST}:{port}"
admin_listen = "{HOST}:{admin_port}"
worker_threads = {a.proxy_workers}
[old]
url = "postgres://{USER}@{HOST}:{a.pg_port}/{OLD_DB}"
[new]
url = "postgres://{USER}@{HOST}:{a.new_port}/{NEW_DB}"
[auth]
method = "trust"
[telemetry]
log_level = "warn"
[mirror]
pool_size = {max(4, a.clients * 2)}

{tables}""")
        self.work, self.popen, self.starts = work, None, 0

    def start(self):
        self.starts += 1
        self.logfile = self.work / f"{self.name}.{self.starts}.log"
        with open(self.logfile, "w") as lf:
            self.popen = subprocess.Popen([self.a.bin, "proxy", "--config", str(self.cfg)], stdin=subprocess.DEVNULL,
                                          stdout=lf, stderr=subprocess.STDOUT,
                                          start_new_session=True)  # Ctrl-C: we stop it
        for _ in range(240):
            ok = subprocess.run(["psql", "-X", "-A", "-t", "-h", HOST, "-p", str(self.port), "-U", USER,
                                 "-d", OLD_DB, "-c", "SELECT 1"], env=pg_env(), capture_output=True,
                                text=True, timeout=10)
            if ok.returncode == 0:
                return
            self.check()
            time.sleep(0.25)
        raise SystemExit(f"proxy {self.name} not ready after 60 s:\n{self.log_tail()}")

    @property
    def pid(self):
        return self.popen.pid

    def log_tail(self):
        try:
            return self.logfile.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def check(self):
        if self.popen is not None and self.popen.poll() is not None:
            raise SystemExit(f"proxy {self.name} exited ({self.popen.returncode}):\n{self.log_tail()}")

    def stop(self):
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)


# --------------------------------------------------------------------------
# pgbench


def pgbench(a, port, mode, duration, logdir, groups=None, quiet_capture=False, script_args=()):
    """One pgbench run against `port` (database OLD_DB: direct, or a proxy in front of it);
    returns tps, failed transactions, p50/p99 latency (ms) from its per-transaction log and, when
    `groups` (name -> (pids, postmaster) as for cpu_split) is given, the CPU µs per committed
    transaction by group in the middle of the run: from `margin` after the start to `margin`
    before the end (margin 1 s, a quarter of shorter runs), the transactions being those that
    pgbench's log shows completed in that window (no query of ours runs in it).
    `quiet_capture` runs the sessions with `session_replication_role = replica`, so OLD's capture
    triggers stay quiet, as before a migration (the direct and passthrough targets: otherwise the
    triggers' net would record every row they change, and OLD would pay for it).
    `script_args` go to pgbench before the database (`-S` for the select-only script)."""
    for f in logdir.glob("pgbench_log*"):
        f.unlink()
    cmd = ["pgbench", "-h", HOST, "-p", str(port), "-U", USER, "-n", "-c", str(a.clients),
           "-j", str(a.threads), "-T", str(duration), "-M", mode, "-l",
           "--log-prefix", str(logdir / "pgbench_log"), *script_args, OLD_DB]
    penv = pg_env()
    if quiet_capture:
        penv["PGOPTIONS"] = "-c session_replication_role=replica"
    bench = subprocess.Popen(cmd, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # on Ctrl-C, killed below
    samples = None
    try:
        if groups is not None:
            margin = min(1.0, duration / 4.0)
            time.sleep(margin)
            t0, s0 = time.time(), cpu_ticks()
            time.sleep(duration - 2 * margin)
            s1, t1 = cpu_ticks(), time.time()
            # someone else's sessions on the shared OLD server are not OLD's cost here
            samples = (t0, s0, s1, t1, foreign_backends(a.pg_port, OLD_DB))
        out, _ = bench.communicate(timeout=duration + 120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    tps = failed = None
    for line in out.splitlines():
        if line.startswith("tps = ") and "without initial connection time" in line:
            tps = float(line.split()[2])
        if line.startswith("number of failed transactions:"):
            failed = int(line.split(":")[1].split()[0])
    if bench.returncode != 0 or tps is None:
        raise SystemExit(f"pgbench against port {port} failed ({bench.returncode}):\n{out[-2000:]}")
    lats, ends = [], []
    for f in logdir.glob("pgbench_log*"):
        for line in f.read_text().splitlines():
            parts = line.split()
            # client_id transaction_no time script_no time_epoch time_us [schedule_lag]
            if len(parts) >= 6 and parts[2].isdigit():
                lats.append(int(parts[2]) / 1000.0)
                ends.append(int(parts[4]) + int(parts[5]) / 1e6)
    lats.sort()
    split = None
    if samples is not None:
        t0, s0, s1, t1, foreign = samples
        txns = sum(1 for t in ends if t0 <= t < t1)
        g = dict(groups)
        g["pgbench"] = ({bench.pid}, None)
        g["OLD: other databases"] = (foreign, None)
        split = cpu_split(s0, s1, g, txns)
        split["txns sampled"] = txns
    return {"tps": tps, "failed": failed or 0, "p50": percentile(lats, 50), "p99": percentile(lats, 99),
            "n": len(lats), "cpu": split}


# --------------------------------------------------------------------------
# report


def verdict(value, target):
    return "n/a" if value is None else ("pass" if value <= target else "fail")


def summarize(mode, runs):
    """Medians over rounds per target, and the three ratios."""
    s = {"mode": mode, "t": {}}
    for t in TARGETS:
        rs = [r for r in runs if r["target"] == t]
        cpu = lambda g: med([r["cpu"].get(g) for r in rs if r["cpu"]])
        s["t"][t] = {"runs": len(rs), "tps": med([r["tps"] for r in rs]),
                     "tps_min": min((r["tps"] for r in rs), default=None),
                     "tps_max": max((r["tps"] for r in rs), default=None),
                     "p50": med([r["p50"] for r in rs]), "p99": med([r["p99"] for r in rs]),
                     "old": cpu("OLD"), "new": cpu("NEW"), "proxy": cpu("proxy"), "pgbench": cpu("pgbench"),
                     "busy": cpu("machine busy"), "failed": sum(r["failed"] for r in rs)}
    T = s["t"]
    s["old_ratio"] = ratio(T["dual_write"]["old"], T["direct"]["old"])
    s["proxy_ratio"] = ratio(T["dual_write"]["proxy"], T["passthrough"]["proxy"])
    dp50, wp50 = T["direct"]["p50"], T["dual_write"]["p50"]
    dp99, wp99 = T["direct"]["p99"], T["dual_write"]["p99"]
    s["added_p50"] = None if dp50 is None or wp50 is None else wp50 - dp50
    s["added_p99"] = None if dp99 is None or wp99 is None else wp99 - dp99

    # same-round ratios (each pair measured within one round), median: robust to drift
    def paired(x, y, key):
        vals = []
        for rnd in sorted({r["round"] for r in runs}):
            rx = [r for r in runs if r["round"] == rnd and r["target"] == x and r["cpu"]]
            ry = [r for r in runs if r["round"] == rnd and r["target"] == y and r["cpu"]]
            if rx and ry and ry[0]["cpu"].get(key):
                vals.append(rx[0]["cpu"][key] / ry[0]["cpu"][key])
        return med(vals)

    s["old_ratio_paired"] = paired("dual_write", "direct", "OLD")
    s["proxy_ratio_paired"] = paired("dual_write", "passthrough", "proxy")
    return s


def report(a, s):
    T = s["t"]
    log(f"\n-- tpcb-{s['mode']} (pgbench -M {s['mode']} -c {a.clients} -j {a.threads}, "
        f"{a.rounds} x {a.duration} s; medians over rounds; CPU in µs per committed transaction) --")
    log(f"{'target':<12} {'tps':>9} {'min':>9} {'max':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'OLD':>7} {'NEW':>7} {'proxy':>7} {'pgbench':>7} {'machine':>8}")
    for t in TARGETS:
        x = T[t]
        log(f"{t:<12} {fmt(x['tps']):>9} {fmt(x['tps_min']):>9} {fmt(x['tps_max']):>9} "
            f"{fmt(x['p50'], '.3f'):>8} {fmt(x['p99'], '.3f'):>8} {fmt(x['old']):>7} {fmt(x['new']):>7} "
            f"{fmt(x['proxy']) if t != 'direct' else '-':>7} {fmt(x['pgbench']):>7} {fmt(x['busy']):>8}")
    log(f"OLD CPU/txn   dual_write / direct      = {fmt(s['old_ratio'], '.3f')}x "
        f"(same-round {fmt(s['old_ratio_paired'], '.3f')}x)  target <= {OLD_CPU_TARGET}x: "
        f"{verdict(s['old_ratio'], OLD_CPU_TARGET)}")
    log(f"proxy CPU/txn dual_write / passthrough = {fmt(s['proxy_ratio'], '.3f')}x "
        f"(same-round {fmt(s['proxy_ratio_paired'], '.3f')}x)  target <= {PROXY_CPU_TARGET}x: "
        f"{verdict(s['proxy_ratio'], PROXY_CPU_TARGET)}")
    log(f"added latency dual_write - direct      = p50 {fmt(s['added_p50'], '+.3f')} ms  target <= "
        f"{ADDED_P50_TARGET_MS} ms: {verdict(s['added_p50'], ADDED_P50_TARGET_MS)};  "
        f"p99 {fmt(s['added_p99'], '+.3f')} ms")


def result_line(s):
    T = s["t"]
    return (f"RESULT mode=tpcb-{s['mode']} "
            f"old_cpu_ratio={fmt(s['old_ratio'], '.3f')} old_cpu_target={OLD_CPU_TARGET} "
            f"old_cpu={verdict(s['old_ratio'], OLD_CPU_TARGET)} "
            f"proxy_cpu_ratio={fmt(s['proxy_ratio'], '.3f')} proxy_cpu_target={PROXY_CPU_TARGET} "
            f"proxy_cpu={verdict(s['proxy_ratio'], PROXY_CPU_TARGET)} "
            f"added_p50_ms={fmt(s['added_p50'], '.3f')} added_p50_target_ms={ADDED_P50_TARGET_MS} "
            f"added_p50={verdict(s['added_p50'], ADDED_P50_TARGET_MS)} "
            f"added_p99_ms={fmt(s['added_p99'], '.3f')} "
            f"old_cpu_us_direct={fmt(T['direct']['old'])} old_cpu_us_dual_write={fmt(T['dual_write']['old'])} "
            f"proxy_cpu_us_passthrough={fmt(T['passthrough']['proxy'])} "
            f"proxy_cpu_us_dual_write={fmt(T['dual_write']['proxy'])} "
            f"new_cpu_us_dual_write={fmt(T['dual_write']['new'])} "
            f"direct_tps={fmt(T['direct']['tps'])} passthrough_tps={fmt(T['passthrough']['tps'])} "
            f"dual_write_tps={fmt(T['dual_write']['tps'])} "
            f"direct_p50_ms={fmt(T['direct']['p50'], '.3f')} dual_write_p50_ms={fmt(T['dual_write']['p50'], '.3f')} "
            f"direct_p99_ms={fmt(T['direct']['p99'], '.3f')} dual_write_p99_ms={fmt(T['dual_write']['p99'], '.3f')}")


# --------------------------------------------------------------------------
# main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e = lambda name, default: env(name, default)
    p.add_argument("--duration", type=int, default=int(e("DURATION", "10")), help="seconds per run (DURATION)")
    p.add_argument("--rounds", type=int, default=int(e("ROUNDS", "3")),
                   help="rounds per mode, each runs every target once (ROUNDS)")
    p.add_argument("--warmup", type=int, default=int(e("WARMUP", "2")),
                   help="seconds of discarded run per target before each mode's rounds, 0 = none (WARMUP)")
    p.add_argument("--clients", type=int, default=int(e("CLIENTS", "8")), help="pgbench -c (CLIENTS)")
    p.add_argument("--threads", type=int, default=int(e("THREADS", "2")),
                   help="pgbench -j, lowered to divide --clients (THREADS)")
    p.add_argument("--scale", type=int, default=int(e("SCALE", "10")), help="pgbench -i -s (SCALE)")
    p.add_argument("--modes", default=e("MODES", "simple,prepared"), help="pgbench -M values (MODES)")
    p.add_argument("--pg-port", type=int, default=int(e("PG_PORT", "5432")),
                   help="OLD: the local server on 127.0.0.1 (PG_PORT)")
    p.add_argument("--new-port", type=int, default=int(e("NEW_PORT", "5442")),
                   help="NEW: the throwaway cluster's port on 127.0.0.1 (NEW_PORT)")
    p.add_argument("--pg-bindir", default=e("PG_BINDIR", ""),
                   help="where initdb and pg_ctl are; default /usr/lib/postgresql/<OLD's major>/bin, "
                        "else pg_ctl's directory on PATH (PG_BINDIR)")
    p.add_argument("--new-settings", default=e("NEW_SETTINGS", ""),
                   help="extra NEW server settings, 'name=value,name=value', after those copied from "
                        "OLD (NEW_SETTINGS)")
    p.add_argument("--checkpoint", type=int, default=int(e("CHECKPOINT", "1")),
                   help="1: CHECKPOINT on OLD and NEW before every measured run, so that each starts "
                        "with clean buffers and none is charged a timed checkpoint; 0: no (CHECKPOINT)")
    p.add_argument("--proxy-port", type=int, default=int(e("PROXY_PORT", "6542")),
                   help="the dual_write proxy (PROXY_PORT)")
    p.add_argument("--admin-port", type=int, default=int(e("ADMIN_PORT", "6591")),
                   help="the dual_write proxy's admin API (ADMIN_PORT)")
    p.add_argument("--passthrough-port", type=int, default=int(e("PASSTHROUGH_PORT", "6543")),
                   help="the passthrough proxy (PASSTHROUGH_PORT)")
    p.add_argument("--passthrough-admin-port", type=int, default=int(e("PASSTHROUGH_ADMIN_PORT", "6592")),
                   help="the passthrough proxy's admin API (PASSTHROUGH_ADMIN_PORT)")
    p.add_argument("--proxy-workers", type=int, default=int(e("PROXY_WORKERS", "1")),
                   help="worker_threads of both proxies, 0 = one per CPU (PROXY_WORKERS)")
    p.add_argument("--bin", default=e("SWITCHYARD_BIN", str(REPO / "target/release/switchyard")),
                   help="the switchyard binary, built with cargo build --release if missing (SWITCHYARD_BIN)")
    p.add_argument("--keep-db", action="store_true", default=bool(os.environ.get("KEEP_DB")),
                   help="keep OLD's database at exit (KEEP_DB=1)")
    p.add_argument("--keep-tmp", action="store_true", default=bool(os.environ.get("KEEP_TMP")),
                   help="keep configs, logs and NEW's stopped cluster (KEEP_TMP=1)")
    a = p.parse_args()
    for name in ("duration", "rounds", "clients", "threads", "scale"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    a.mode_list = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in a.mode_list:
        if m not in ("simple", "extended", "prepared"):
            p.error(f"unknown mode {m!r}: simple, extended or prepared")
    t = max(1, min(a.threads, a.clients))
    while a.clients % t:
        t -= 1
    a.threads = t
    return a


def main():
    a = parse_args()

    def on_signal(signum, _frame):
        raise SystemExit(f"caught signal {signum}; cleaning up")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    for port, what in ((a.new_port, "NEW_PORT"), (a.proxy_port, "PROXY_PORT"), (a.admin_port, "ADMIN_PORT"),
                       (a.passthrough_port, "PASSTHROUGH_PORT"), (a.passthrough_admin_port, "PASSTHROUGH_ADMIN_PORT")):
        if port_open(port):
            raise SetupError(f"{HOST}:{port} ({what}) is already in use; refusing to benchmark an unknown server")
    try:
        psql(a.pg_port, "postgres", "SELECT 1", timeout=30)
    except SystemExit as e:
        raise SetupError(f"OLD unreachable at {HOST}:{a.pg_port}: {e}")
    if not Path(a.bin).is_file():
        log(f"{a.bin} missing: cargo build --release ...")
        subprocess.run(["cargo", "build", "--release"], cwd=str(REPO), check=True, timeout=2400)

    work = Path(tempfile.mkdtemp(prefix="switchyard-dw-bench-"))
    proxies = {}
    new = None
    old_created = False
    status = 0
    try:
        # NEW: a cluster of its own, configured like OLD
        bindir = find_bindir(a)
        rows = psql(a.pg_port, "postgres", "SELECT name, current_setting(name) FROM pg_settings WHERE name IN ("
                    + ",".join(f"'{s}'" for s in COPIED_SETTINGS) + ")")
        settings = dict(line.split("|", 1) for line in rows.splitlines())
        for item in filter(None, (x.strip() for x in a.new_settings.split(","))):
            k, _, v = item.partition("=")
            settings[k.strip()] = v.strip()
        locale = psql(a.pg_port, "postgres", "SELECT datcollate FROM pg_database WHERE datname = 'template1'")
        new = NewCluster(bindir, a.new_port, settings, a.keep_tmp)
        new.start(locale)
        version = psql(a.new_port, "postgres", "SHOW server_version")
        log(f"NEW: cluster {version.split()[0]} at {HOST}:{a.new_port}, data {new.data}, locale {locale}, "
            f"settings from OLD: " + " ".join(f"{k}={v}" for k, v in sorted(settings.items())))

        old_created = True
        for port, db in ((a.pg_port, OLD_DB), (a.new_port, NEW_DB)):
            psql(port, "postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            psql(port, "postgres", f"CREATE DATABASE {db}")
            run(["pgbench", "-h", HOST, "-p", str(port), "-U", USER, "-i", "-q", "-s", str(a.scale), db], timeout=1800)
            psql(port, db, "VACUUM ANALYZE", timeout=600)

        proxies["dual_write"] = Proxy("dual_write", a, work, "dual_write", a.proxy_port, a.admin_port)
        proxies["passthrough"] = Proxy("passthrough", a, work, "passthrough", a.passthrough_port,
                                       a.passthrough_admin_port)
        r = subprocess.run([a.bin, "prepare", "--config", str(proxies["dual_write"].cfg)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise SystemExit(f"switchyard prepare failed:\n{r.stdout}{r.stderr}")
        for px in proxies.values():
            px.start()
        old_pm, new_pm = postmaster_pid(a.pg_port), postmaster_pid(a.new_port)
        log(f"OLD: {HOST}:{a.pg_port} (postmaster {old_pm}); proxies: dual_write {HOST}:{a.proxy_port} "
            f"(pid {proxies['dual_write'].pid}), passthrough {HOST}:{a.passthrough_port} "
            f"(pid {proxies['passthrough'].pid})")
        ports = {"direct": a.pg_port, "passthrough": a.passthrough_port, "dual_write": a.proxy_port}
        log(f"clients={a.clients} threads={a.threads} duration={a.duration}s rounds={a.rounds} scale={a.scale} "
            f"warmup={a.warmup}s modes={','.join(a.mode_list)}")

        summaries = []
        for mode in a.mode_list:
            log(f"\n== tpcb-{mode} ==")
            if a.warmup:
                for t in TARGETS:
                    for px in proxies.values():
                        px.check()
                    pgbench(a, ports[t], mode, a.warmup, work, quiet_capture=t != "dual_write")
            runs = []
            for rnd in range(a.rounds):
                k = rnd % len(TARGETS)
                for t in TARGETS[k:] + TARGETS[:k]:  # rotate the order each round
                    for px in proxies.values():
                        px.check()
                    groups = {"OLD": (set(), old_pm), "NEW": (set(), new_pm),
                              "proxy": ({proxies[t].pid} if t in proxies else set(), None)}
                    # the proxy not under test idles; its CPU goes to "other"
                    if a.checkpoint:  # every run starts alike, none meets a timed checkpoint
                        psql(a.pg_port, "postgres", "CHECKPOINT", timeout=600)
                        psql(a.new_port, "postgres", "CHECKPOINT", timeout=600)
                    res = pgbench(a, ports[t], mode, a.duration, work, groups, quiet_capture=t != "dual_write")
                    res.update(target=t, round=rnd + 1)
                    runs.append(res)
                    log(f"  round {rnd + 1}/{a.rounds} {t:<11} tps={res['tps']:9.1f} p50={res['p50']:.3f} ms "
                        f"p99={res['p99']:.3f} ms failed={res['failed']}")
                    c = res["cpu"]
                    log("      CPU µs/txn: " + ", ".join(f"{g} {v}" for g, v in c.items()
                                                       if g != "txns sampled" and (v or g == "machine busy"))
                        + f" ({c['txns sampled']} txns sampled)")
            s = summarize(mode, runs)
            summaries.append(s)
            report(a, s)
            failed = sum(x["failed"] for x in s["t"].values())
            if failed:
                log(f"WARNING: pgbench reported {failed} failed transaction(s) in tpcb-{mode}")
                status = 1

        log("")
        for s in summaries:
            log(result_line(s))

        # Direct and passthrough runs wrote OLD only, so OLD and NEW differ by design now. Verify
        # the mirror with one last dual_write-only run on freshly synchronised stores instead.
        log("\nchecking convergence: resync NEW from OLD, one dual_write run, full comparison ...")
        for px in proxies.values():
            px.stop()
        dump = run(["pg_dump", "-h", HOST, "-p", str(a.pg_port), "-U", USER, "-a", "--disable-triggers",
                    *sum((["-t", t] for t in TABLES), []), OLD_DB], timeout=600).stdout
        side = psql(a.new_port, NEW_DB, "SELECT string_agg(format('%I.%I', schemaname, tablename), ', ') "
                                        "FROM pg_tables WHERE schemaname = 'switchyard' AND (tablename = "
                                        "'switchyard_applied' OR tablename LIKE 'switchyard\\_keys\\_%')")
        psql(a.new_port, NEW_DB, "TRUNCATE " + ", ".join(TABLES) + (f", {side}" if side else ""))
        # Intents left by the runs above (a NEW apply that timed out) would re-copy rows the dump
        # already has: appended history rows twice.
        psql(a.pg_port, OLD_DB, "DELETE FROM switchyard.switchyard_intents")
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(a.new_port), "-U",
                        USER, "-d", NEW_DB], input=dump, env=pg_env(), capture_output=True, text=True,
                       check=True, timeout=600)
        proxies["dual_write"].start()
        pgbench(a, a.proxy_port, "prepared", min(5, a.duration), work)
        proxies["dual_write"].check()
        time.sleep(1.5)
        for t in TABLES:
            q = (f"SELECT md5(string_agg(r, E'\\n' ORDER BY r COLLATE \"C\")) "
                 f"FROM (SELECT row_to_json(x)::text r FROM {t} x) s")
            o, n = psql(a.pg_port, OLD_DB, q), psql(a.new_port, NEW_DB, q)
            log(f"  {t:18} {'identical' if o == n else 'DIFFERENT'}")
            if o != n:
                raise SystemExit(f"{t} differs between OLD and NEW")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for px in proxies.values():
            try:
                px.stop()
            except Exception as e:  # keep cleaning up
                log(f"WARNING: stopping proxy {px.name}: {e}")
        if old_created and not a.keep_db:
            subprocess.run(["psql", "-X", "-q", "-h", HOST, "-p", str(a.pg_port), "-U", USER, "-d", "postgres",
                            "-c", f"DROP DATABASE IF EXISTS {OLD_DB} WITH (FORCE)"], env=pg_env(),
                           capture_output=True, timeout=120)
        if new is not None:
            new.stop()
        if a.keep_tmp:
            log(f"(configs and logs kept in {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
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
