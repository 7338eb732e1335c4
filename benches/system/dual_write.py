#!/usr/bin/env python3
"""Dual-write benchmark: pgbench tpcb-like through Switchyard in phase dual_write vs direct.

Creates two databases on the local PostgreSQL (OLD = switchyard_dw_old, NEW =
switchyard_dw_new), initialises both with `pgbench -i -s SCALE` (identical
starting data), runs `switchyard prepare`, starts the proxy with the four
pgbench tables in dual_write, then alternates pgbench runs direct to OLD and
through the proxy (which writes every transaction to both databases), and prints
TPS, the ratio proxy/direct, and p50/p99 latency with the latency the proxy adds.
At the end it checks that OLD and NEW hold the same rows (full comparison).

Standard library only. Environment / flags: DURATION (10), ROUNDS (3),
CLIENTS (8), THREADS (2), SCALE (10), MODES (simple,prepared), PG_PORT (5432),
PROXY_PORT (6542), ADMIN_PORT (6591), SWITCHYARD_BIN (target/release/switchyard),
PROXY_WORKERS (1), KEEP_DB. Loopback only; every run bounded by its duration.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pglocal import HOST, USER, env, log, pg_env, psql as _psql, run

OLD_DB = "switchyard_dw_old"
NEW_DB = "switchyard_dw_new"
REPO = Path(__file__).resolve().parents[2]
TABLES = ["pgbench_accounts", "pgbench_tellers", "pgbench_branches", "pgbench_history"]


def psql(port, db, sql, timeout=120):
    """psql on the local server; this script's statements are small, so it waits 2 minutes."""
    return _psql(port, db, sql, timeout)


def percentile(sorted_xs, p):
    if not sorted_xs:
        return None
    k = min(len(sorted_xs) - 1, max(0, int(round(p / 100.0 * (len(sorted_xs) - 1)))))
    return sorted_xs[k]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks():
    """utime+stime (clock ticks) of every process, and the machine's busy ticks."""
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        procs[int(pid)] = int(fields[11]) + int(fields[12])
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return procs, sum(v) - v[3] - v[4]


def backends(port):
    """pid -> 'datname/application_name' of the server's client backends."""
    out = psql(port, "postgres", "SELECT pid, datname, application_name FROM pg_stat_activity "
                                 "WHERE backend_type = 'client backend'")
    m = {}
    for line in out.splitlines():
        pid, db, app = line.split("|")
        m[int(pid)] = f"{db}/{app or '-'}"
    return m


def history_rows(a):
    return int(psql(a.pg_port, OLD_DB, "SELECT count(*) FROM pgbench_history"))


def cpu_split(a, before, after, groups, txns):
    """CPU µs per transaction by group, from two cpu_ticks() samples."""
    (pa, ba), (pb, bb) = before, after
    per = {}
    for pid, t in pb.items():
        d = t - pa.get(pid, t)
        if d > 0:
            g = groups.get(pid, "other")
            per[g] = per.get(g, 0) + d
    us = lambda ticks: ticks / CLK_TCK / max(txns, 1) * 1e6
    split = {g: round(us(t), 1) for g, t in sorted(per.items(), key=lambda x: -x[1])}
    split["machine busy"] = round(us(bb - ba), 1)
    return split


def pgbench(a, port, db, mode, duration, logdir, proxy_pid=None):
    """One pgbench run; returns tps, per-transaction latencies (ms) from its log, and the CPU
    each process group spent per transaction in the middle of the run (sampled from 1 s after
    the start to 1 s before the end; transactions counted as new pgbench_history rows)."""
    for f in logdir.glob("pgbench_log*"):
        f.unlink()
    cmd = ["pgbench", "-h", HOST, "-p", str(port), "-U", USER, "-n", "-c", str(a.clients),
           "-j", str(a.threads), "-T", str(duration), "-M", mode, "-l",
           "--log-prefix", str(logdir / "pgbench_log"), db]
    bench = subprocess.Popen(cmd, env=pg_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    split = None
    try:
        if duration >= 4:
            time.sleep(1.0)
            h0, s0 = history_rows(a), cpu_ticks()
            time.sleep(duration - 2.0)
            s1, h1 = cpu_ticks(), history_rows(a)
            groups = {pid: f"postgres {name}" for pid, name in backends(a.pg_port).items()}
            groups[bench.pid] = "pgbench"
            if proxy_pid is not None:
                groups[proxy_pid] = "switchyard proxy"
            split = cpu_split(a, s0, s1, groups, h1 - h0)
        out, _ = bench.communicate(timeout=duration + 120)
    finally:
        if bench.poll() is None:
            bench.kill()
    r = subprocess.CompletedProcess(cmd, bench.returncode, out, "")
    out = r.stdout + r.stderr
    tps = None
    for line in out.splitlines():
        if line.startswith("tps = ") and "without initial connection time" in line:
            tps = float(line.split()[2])
    failed = 0
    for line in out.splitlines():
        if line.startswith("number of failed transactions:"):
            failed = int(line.split(":")[1].split()[0])
    if r.returncode != 0 or tps is None:
        raise SystemExit(f"pgbench failed ({r.returncode}):\n{out[-2000:]}")
    lats = []
    for f in logdir.glob("pgbench_log*"):
        for line in f.read_text().splitlines():
            parts = line.split()
            # client_id transaction_no time script_no time_epoch time_us [schedule_lag]
            if len(parts) >= 3 and parts[2].isdigit():
                lats.append(int(parts[2]) / 1000.0)
    lats.sort()
    return {"tps": tps, "failed": failed, "p50": percentile(lats, 50), "p99": percentile(lats, 99),
            "n": len(lats), "cpu": split}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=int(env("DURATION", "10")))
    p.add_argument("--rounds", type=int, default=int(env("ROUNDS", "3")))
    p.add_argument("--clients", type=int, default=int(env("CLIENTS", "8")))
    p.add_argument("--threads", type=int, default=int(env("THREADS", "2")))
    p.add_argument("--scale", type=int, default=int(env("SCALE", "10")))
    p.add_argument("--modes", default=env("MODES", "simple,prepared"))
    p.add_argument("--pg-port", type=int, default=int(env("PG_PORT", "5432")))
    p.add_argument("--proxy-port", type=int, default=int(env("PROXY_PORT", "6542")))
    p.add_argument("--admin-port", type=int, default=int(env("ADMIN_PORT", "6591")))
    p.add_argument("--proxy-workers", type=int, default=int(env("PROXY_WORKERS", "1")))
    p.add_argument("--bin", default=env("SWITCHYARD_BIN", str(REPO / "target/release/switchyard")))
    a = p.parse_args()

    if not Path(a.bin).is_file():
        log(f"{a.bin} missing: cargo build --release ...")
        subprocess.run(["cargo", "build", "--release"], cwd=str(REPO), check=True, timeout=1800)
    work = Path(tempfile.mkdtemp(prefix="switchyard-dw-bench-"))
    proxy = None
    try:
        for db in (OLD_DB, NEW_DB):
            psql(a.pg_port, "postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            psql(a.pg_port, "postgres", f"CREATE DATABASE {db}")
            run(["pgbench", "-h", HOST, "-p", str(a.pg_port), "-U", USER, "-i", "-q", "-s", str(a.scale), db])
        cfg = work / "switchyard.toml"
        tables = "".join(f'[[tables]]\nname = "public.{t}"\nphase = "dual_write"\n\n' for t in TABLES)
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
log_level = "warn"
[mirror]
pool_size = {max(4, a.clients * 2)}

{tables}""")
        r = subprocess.run([a.bin, "prepare", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise SystemExit(f"switchyard prepare failed:\n{r.stdout}{r.stderr}")
        logf = open(work / "proxy.log", "w")
        proxy = subprocess.Popen([a.bin, "proxy", "--config", str(cfg)], stdout=logf, stderr=subprocess.STDOUT)
        for _ in range(120):
            ok = subprocess.run(["psql", "-X", "-A", "-t", "-h", HOST, "-p", str(a.proxy_port), "-U", USER,
                                 "-d", OLD_DB, "-c", "SELECT 1"], env=pg_env(), capture_output=True,
                                text=True, timeout=10)
            if ok.returncode == 0:
                break
            if proxy.poll() is not None:
                raise SystemExit(f"proxy exited:\n{(work / 'proxy.log').read_text()[-2000:]}")
            time.sleep(0.25)
        else:
            raise SystemExit("proxy not ready")
        log(f"clients={a.clients} threads={a.threads} duration={a.duration}s rounds={a.rounds} scale={a.scale}")
        results = {}
        for mode in a.modes.split(","):
            direct, through = [], []
            for rnd in range(a.rounds):
                order = [("direct", a.pg_port), ("proxy", a.proxy_port)]
                if rnd % 2:
                    order.reverse()
                for name, port in order:
                    res = pgbench(a, port, OLD_DB, mode, a.duration, work,
                                  proxy.pid if name == "proxy" else None)
                    (direct if name == "direct" else through).append(res)
                    log(f"  {mode:8} round {rnd + 1}/{a.rounds} {name:6} tps={res['tps']:9.1f} "
                        f"p50={res['p50']:.3f} ms p99={res['p99']:.3f} ms failed={res['failed']}")
                    if res["cpu"]:
                        log("           CPU µs/txn: " + ", ".join(f"{g} {v}" for g, v in res["cpu"].items()))
            med = lambda rs, k: statistics.median(r[k] for r in rs)
            d_tps, p_tps = med(direct, "tps"), med(through, "tps")
            d50, d99, p50, p99 = med(direct, "p50"), med(direct, "p99"), med(through, "p50"), med(through, "p99")
            results[mode] = (d_tps, p_tps)
            log(f"RESULT mode=tpcb-{mode} direct_tps={d_tps:.1f} proxy_dual_write_tps={p_tps:.1f} "
                f"ratio={p_tps / d_tps:.3f} direct_p50_ms={d50:.3f} proxy_p50_ms={p50:.3f} "
                f"added_p50_ms={p50 - d50:.3f} direct_p99_ms={d99:.3f} proxy_p99_ms={p99:.3f} "
                f"added_p99_ms={p99 - d99:.3f}")
            cpu = lambda rs, g: statistics.median(r["cpu"].get(g, 0.0) for r in rs) if all(r["cpu"] for r in rs) else None
            d_busy, p_busy, p_proxy = cpu(direct, "machine busy"), cpu(through, "machine busy"), cpu(through, "switchyard proxy")
            if d_busy is not None and p_busy is not None:
                log(f"CPU mode=tpcb-{mode} direct_busy_us_per_txn={d_busy:.0f} proxy_busy_us_per_txn={p_busy:.0f} "
                    f"proxy_process_us_per_txn={p_proxy:.0f}")
        # Direct runs wrote OLD only; compare only what the proxy mirrored would be wrong, so
        # compare after copying: the direct runs make OLD and NEW differ by design. Verify the
        # mirror with one last proxy-only run on freshly synchronised stores instead.
        log("checking convergence: resync NEW from OLD, one proxy run, full comparison ...")
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=30)
        proxy = None
        dump = run(["pg_dump", "-h", HOST, "-p", str(a.pg_port), "-U", USER, "-a", "--disable-triggers",
                    *sum((["-t", t] for t in TABLES), []), OLD_DB], timeout=600).stdout
        psql(a.pg_port, NEW_DB, "TRUNCATE " + ", ".join(TABLES) + "; TRUNCATE switchyard.switchyard_applied")
        for t in TABLES[:3]:
            psql(a.pg_port, NEW_DB, f"TRUNCATE switchyard.switchyard_keys_public_{t}")
        subprocess.run(["psql", "-X", "-q", "-h", HOST, "-p", str(a.pg_port), "-U", USER, "-d", NEW_DB],
                       input=dump, env=pg_env(), capture_output=True, text=True, check=True, timeout=600)
        logf = open(work / "proxy2.log", "w")
        proxy = subprocess.Popen([a.bin, "proxy", "--config", str(cfg)], stdout=logf, stderr=subprocess.STDOUT)
        time.sleep(1.5)
        pgbench(a, a.proxy_port, OLD_DB, "prepared", min(5, a.duration), work)
        time.sleep(1.5)
        for t in TABLES:
            q = f"SELECT md5(string_agg(r, E'\\n' ORDER BY r)) FROM (SELECT row_to_json(x)::text r FROM {t} x) s"
            o, n = psql(a.pg_port, OLD_DB, q), psql(a.pg_port, NEW_DB, q)
            log(f"  {t:18} {'identical' if o == n else 'DIFFERENT'}")
            if o != n:
                raise SystemExit(f"{t} differs between OLD and NEW")
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proxy.kill()
        if not os.environ.get("KEEP_DB"):
            for db in (OLD_DB, NEW_DB):
                subprocess.run(["psql", "-X", "-q", "-h", HOST, "-p", str(a.pg_port), "-U", USER, "-d", "postgres",
                                "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], env=pg_env(),
                               capture_output=True, timeout=120)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
