#!/usr/bin/env python3
"""Shadow-read benchmark: pgbench -S through Switchyard in dual_write and in shadow_read at 100%.

OLD (switchyard_sr_old) and NEW (switchyard_sr_new) are databases on the local server
(127.0.0.1:PG_PORT), both with `pgbench -i -s SCALE`, then `switchyard prepare`. Two proxies
start from the same binary: one with the four pgbench tables in dual_write, one with them in
shadow_read and shadow_share = 100. Each round runs `pgbench -S` once against each (the order
alternates by round); each run gives TPS and p50/p99 latency from pgbench's per-transaction log.
It prints a table, the medians, and one RESULT line: TPS shadow_read/dual_write and the p50 and
p99 latency shadow_read adds. Then the shadow proxy's /status figures (match, mismatch, error,
skipped for pgbench_accounts): equal data must give no mismatch (exit 1 otherwise).

Both databases share one server and its 2 cores here: NEW's shadow reads compete with OLD for
the same CPU, so the TPS cost is an upper bound of what a NEW on its own machine costs.

Standard library only. Options: see --help. Loopback only; every run bounded by its duration.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from dual_write import Proxy, pgbench
from pglocal import HOST, USER, env, fmt, log, median_or_none as med, psql as _psql, ratio, run

OLD_DB = "switchyard_sr_old"
NEW_DB = "switchyard_sr_new"
REPO = Path(__file__).resolve().parents[2]
TARGETS = ("dual_write", "shadow_read")


def psql(port, db, sql, timeout=600):
    return _psql(port, db, sql, timeout)


def parse_args():
    e = env
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pg-port", type=int, default=int(e("PG_PORT", "5432")))
    p.add_argument("--scale", type=int, default=int(e("SCALE", "10")))
    p.add_argument("--clients", type=int, default=int(e("CLIENTS", "8")))
    p.add_argument("--threads", type=int, default=int(e("THREADS", "2")))
    p.add_argument("--duration", type=int, default=int(e("DURATION", "20")))
    p.add_argument("--rounds", type=int, default=int(e("ROUNDS", "3")))
    p.add_argument("--mode", default=e("MODE", "prepared"), help="pgbench -M: simple, extended or prepared")
    p.add_argument("--proxy-workers", type=int, default=int(e("PROXY_WORKERS", "2")))
    p.add_argument("--port", type=int, default=int(e("PROXY_PORT", "6461")),
                   help="dual_write proxy; shadow_read on port+2, admin ports +1 and +3")
    p.add_argument("--bin", default=e("SWITCHYARD_BIN", str(REPO / "target/release/switchyard")))
    a = p.parse_args()
    # What dual_write.Proxy reads: NEW is on the same server here.
    a.new_port = a.pg_port
    return a


def shadow_figures(admin_port):
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/status", timeout=10) as r:
        status = json.load(r)
    return {t["name"]: t.get("shadow_reads") for t in status["tables"]}


def main():
    a = parse_args()
    if not Path(a.bin).exists():
        raise SystemExit(f"{a.bin} missing: cargo build --release -p switchyard")
    work = Path(tempfile.mkdtemp(prefix="switchyard-sr-bench-"))
    proxies = {}
    try:
        for db in (OLD_DB, NEW_DB):
            psql(a.pg_port, "postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            psql(a.pg_port, "postgres", f"CREATE DATABASE {db}")
            run(["pgbench", "-h", HOST, "-p", str(a.pg_port), "-U", USER, "-i", "-q", "-s", str(a.scale), db],
                timeout=1800)
            psql(a.pg_port, db, "VACUUM ANALYZE")
        import dual_write
        dual_write.OLD_DB, dual_write.NEW_DB = OLD_DB, NEW_DB
        proxies["dual_write"] = Proxy("dual_write", a, work, "dual_write", a.port, a.port + 1)
        proxies["shadow_read"] = Proxy("shadow_read", a, work, "shadow_read", a.port + 2, a.port + 3)
        cfg = proxies["shadow_read"].cfg
        cfg.write_text(cfg.read_text().replace('phase = "shadow_read"\n', 'phase = "shadow_read"\nshadow_share = 100\n'))
        r = subprocess.run([a.bin, "prepare", "--config", str(proxies["dual_write"].cfg)],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SystemExit(f"switchyard prepare failed:\n{r.stdout}{r.stderr}")
        for px in proxies.values():
            px.start()
        log(f"clients={a.clients} threads={a.threads} duration={a.duration}s rounds={a.rounds} "
            f"scale={a.scale} mode={a.mode}")
        runs = {t: [] for t in TARGETS}
        log(f"{'round':>5} {'target':<12} {'tps':>9} {'p50 ms':>8} {'p99 ms':>8}")
        for rnd in range(a.rounds):
            order = TARGETS if rnd % 2 == 0 else tuple(reversed(TARGETS))
            for t in order:
                res = pgbench(a, proxies[t].port, a.mode, a.duration, work, script_args=["-S"])
                runs[t].append(res)
                log(f"{rnd + 1:>5} {t:<12} {res['tps']:>9.0f} {fmt(res['p50'], '.3f'):>8} {fmt(res['p99'], '.3f'):>8}")
        m = {t: {k: med([r[k] for r in runs[t]]) for k in ("tps", "p50", "p99")} for t in TARGETS}
        for t in TARGETS:
            log(f"median {t:<12} tps {m[t]['tps']:.0f}  p50 {fmt(m[t]['p50'], '.3f')} ms  "
                f"p99 {fmt(m[t]['p99'], '.3f')} ms")
        tps_ratio = ratio(m["shadow_read"]["tps"], m["dual_write"]["tps"])
        add = lambda k: None if m["shadow_read"][k] is None or m["dual_write"][k] is None else \
            m["shadow_read"][k] - m["dual_write"][k]
        time.sleep(6)  # shadows still in flight finish (or time out) first
        figures = shadow_figures(a.port + 3)
        acc = figures.get("public.pgbench_accounts") or {}
        log(f"RESULT shadow_read/dual_write tps {fmt(tps_ratio, '.2f')}x, added p50 {fmt(add('p50'), '.3f')} ms, "
            f"added p99 {fmt(add('p99'), '.3f')} ms; pgbench_accounts shadows: "
            + ", ".join(f"{k} {acc.get(k)}" for k in ("match", "mismatch", "error", "skipped")))
        if acc.get("mismatch"):
            log(f"FAIL: mismatches on equal data: {json.dumps(acc.get('examples'))[:1500]}")
            return 1
        return 0
    finally:
        for px in proxies.values():
            px.stop()
        for db in (OLD_DB, NEW_DB):
            subprocess.run(["psql", "-X", "-q", "-h", HOST, "-p", str(a.pg_port), "-U", USER, "-d", "postgres",
                            "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], capture_output=True, timeout=120)


if __name__ == "__main__":
    sys.exit(main())
