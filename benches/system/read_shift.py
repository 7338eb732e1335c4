#!/usr/bin/env python3
"""Read-shift benchmark: pgbench -S -M prepared through Switchyard in dual_write and in read_shift at read shares 0, 50 and 100.

OLD (switchyard_rs_old) and NEW (switchyard_rs_new) are databases on the local server
(127.0.0.1:PG_PORT), both with `pgbench -i -s SCALE`, then `switchyard prepare`. Four proxies
start from the same binary: one with the four pgbench tables in dual_write, three with them in
read_shift at read_share 0, 50 and 100 (each proxy's share comes from its config; nothing
writes control state). Each round runs `pgbench -S -M prepared` once against each proxy (the
order rotates by round); each run gives TPS, p50/p99 latency from pgbench's per-transaction log,
the proxy's CPU µs per transaction (utime+stime from /proc over the middle of the run, as
dual_write.py measures it) and the reads of pgbench_accounts served by each store (deltas of
`switchyard_reads_total` in /metrics), so the figures say where the reads went. It prints a table,
the medians, and one RESULT line with the ratios against dual_write. A read that fell back from
NEW to OLD (`switchyard_read_fallbacks_total`) on equal data makes the exit status 1.

Both databases share one server and its 2 cores here: the reads NEW serves compete with OLD for
the same CPU, and the proxy's extra work (its own connection per session to NEW, the answer held
and its ids rewritten) is what the read_shift/dual_write ratios show.

Sessions are what the share counts: at 50 each of the CLIENTS sessions of a run draws its store
once, so a run's NEW fraction varies around a half (the /metrics deltas give the real one).

Standard library only. Options: see --help. Loopback only; every run bounded by its duration.
"""

import argparse
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import dual_write
from dual_write import Proxy, pgbench, postmaster_pid
from pglocal import HOST, drop_databases, psql as _psql, env, fmt, log, median_or_none as med, pgbench_databases, ratio

OLD_DB = "switchyard_rs_old"
NEW_DB = "switchyard_rs_new"
REPO = Path(__file__).resolve().parents[2]
SHARES = (0, 50, 100)
TARGETS = ("dual_write",) + tuple(f"read_shift_{s}" for s in SHARES)
METRIC = re.compile(r'^(switchyard_reads_total|switchyard_read_fallbacks_total)\{([^}]*)\}\s+(\S+)')


def parse_args():
    e = env
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pg-port", type=int, default=int(e("PG_PORT", "5432")))
    p.add_argument("--scale", type=int, default=int(e("SCALE", "10")))
    p.add_argument("--clients", type=int, default=int(e("CLIENTS", "8")))
    p.add_argument("--threads", type=int, default=int(e("THREADS", "2")))
    p.add_argument("--duration", type=int, default=int(e("DURATION", "10")))
    p.add_argument("--rounds", type=int, default=int(e("ROUNDS", "2")))
    p.add_argument("--proxy-workers", type=int, default=int(e("PROXY_WORKERS", "2")))
    p.add_argument("--port", type=int, default=int(e("PROXY_PORT", "6471")),
                   help="first proxy's port; proxy i listens on port+2i, its admin API on port+2i+1")
    p.add_argument("--bin", default=e("SWITCHYARD_BIN", str(REPO / "target/release/switchyard")))
    a = p.parse_args()
    a.new_port = a.pg_port  # what dual_write.Proxy reads: NEW is on the same server here
    return a


def read_metrics(admin_port):
    """(store -> reads, reason -> fallbacks) of pgbench_accounts from /metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    reads, fallbacks = {}, {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m or 'pgbench_accounts"' not in m.group(2):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if m.group(1) == "switchyard_reads_total":
            reads[labels.get("store")] = float(m.group(3))
        else:
            fallbacks[labels.get("reason")] = float(m.group(3))
    return reads, fallbacks


def main():
    a = parse_args()
    if not Path(a.bin).exists():
        raise SystemExit(f"{a.bin} missing: cargo build --release -p switchyard")
    work = Path(tempfile.mkdtemp(prefix="switchyard-rs-bench-"))
    proxies = {}
    try:
        pgbench_databases(a.pg_port, (OLD_DB, NEW_DB), a.scale)
        dual_write.OLD_DB, dual_write.NEW_DB = OLD_DB, NEW_DB
        for i, t in enumerate(TARGETS):
            phase = "dual_write" if t == "dual_write" else "read_shift"
            px = Proxy(t, a, work, phase, a.port + 2 * i, a.port + 2 * i + 1)
            px.admin_port = a.port + 2 * i + 1
            if phase == "read_shift":
                share = t.rsplit("_", 1)[1]
                px.cfg.write_text(px.cfg.read_text().replace(
                    'phase = "read_shift"\n', f'phase = "read_shift"\nread_share = {share}\n'))
            proxies[t] = px
        r = subprocess.run([a.bin, "prepare", "--config", str(proxies["dual_write"].cfg)],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SystemExit(f"switchyard prepare failed:\n{r.stdout}{r.stderr}")
        pm = postmaster_pid(a.pg_port)
        log(f"clients={a.clients} threads={a.threads} duration={a.duration}s rounds={a.rounds} "
            f"scale={a.scale} proxy workers={a.proxy_workers}")
        runs = {t: [] for t in TARGETS}
        fell_back = 0
        log(f"{'round':>5} {'target':<14} {'tps':>9} {'p50 ms':>8} {'p99 ms':>8} {'proxy µs/txn':>12} "
            f"{'reads old':>10} {'reads new':>10}")
        for rnd in range(a.rounds):
            k = rnd % len(TARGETS)
            for t in TARGETS[k:] + TARGETS[:k]:  # rotate the order each round
                # One proxy runs at a time (four, each with its pools and a connection to NEW
                # per session, would not fit in a shared server's max_connections), after a
                # 2 s warm-up: connections, plans, NEW's caches, the read lease.
                px = proxies[t]
                # The control state in OLD, seeded by the first proxy that starts, would win over
                # the next one's file: cleared so that each proxy seeds its own phase and share.
                _psql(a.pg_port, OLD_DB, "DELETE FROM switchyard.switchyard_control", 60)
                px.start()
                pgbench(a, px.port, "prepared", 2, work, script_args=["-S"])
                before = read_metrics(px.admin_port)
                groups = {"PostgreSQL": (set(), pm), "proxy": ({px.pid}, None)}
                res = pgbench(a, px.port, "prepared", a.duration, work, groups, script_args=["-S"])
                after = read_metrics(px.admin_port)
                for store in ("old", "new"):
                    res[f"reads_{store}"] = after[0].get(store, 0) - before[0].get(store, 0)
                res["fallbacks"] = sum(after[1].values()) - sum(before[1].values())
                fell_back += res["fallbacks"]
                px.stop()
                res["proxy_us"] = res["cpu"].get("proxy")
                runs[t].append(res)
                ro, rn = (f"{res[f'reads_{s}']:.0f}" if t != "dual_write" else "-" for s in ("old", "new"))
                log(f"{rnd + 1:>5} {t:<14} {res['tps']:>9.0f} {fmt(res['p50'], '.3f'):>8} "
                    f"{fmt(res['p99'], '.3f'):>8} {fmt(res['proxy_us']):>12} {ro:>10} {rn:>10}"
                    + (f"  fallbacks {res['fallbacks']:.0f}" if res["fallbacks"] else ""))
        keys = ("tps", "p50", "p99", "proxy_us")
        m = {t: {k: med([r[k] for r in runs[t]]) for k in keys} for t in TARGETS}
        for t in TARGETS:
            share = ""
            if t != "dual_write":
                o, n = sum(r["reads_old"] for r in runs[t]), sum(r["reads_new"] for r in runs[t])
                share = f"  reads served by NEW {fmt(ratio(100 * n, o + n), '.0f')}%"
            log(f"median {t:<14} tps {m[t]['tps']:.0f}  p50 {fmt(m[t]['p50'], '.3f')} ms  "
                f"p99 {fmt(m[t]['p99'], '.3f')} ms  proxy {fmt(m[t]['proxy_us'])} µs/txn{share}")
        base = m["dual_write"]
        log("RESULT read_shift/dual_write " + "; ".join(
            f"share {s}: tps {fmt(ratio(m[f'read_shift_{s}']['tps'], base['tps']), '.2f')}x, "
            f"p99 {fmt(ratio(m[f'read_shift_{s}']['p99'], base['p99']), '.2f')}x, "
            f"proxy CPU {fmt(ratio(m[f'read_shift_{s}']['proxy_us'], base['proxy_us']), '.2f')}x"
            for s in SHARES))
        if fell_back:
            log(f"FAIL: {fell_back:.0f} reads fell back from NEW to OLD on equal data")
            return 1
        return 0
    finally:
        for px in proxies.values():
            px.stop()
        drop_databases(a.pg_port, (OLD_DB, NEW_DB))

if __name__ == "__main__":
    sys.exit(main())
