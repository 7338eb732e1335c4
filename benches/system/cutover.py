#!/usr/bin/env python3
"""Cutover benchmark: tpcb-like writes through two proxies across the cutover barrier (and back).

OLD (switchyard_co_old) and NEW (switchyard_co_new) are databases on the local server, both with
`pgbench -i -s SCALE` (equal data, so no backfill is needed), then `switchyard prepare` with the
four pgbench tables in dual_write and `switchyard phase --to read_shift`. Two proxies run from the
same binary (`[control] poll_interval_ms` 200). Two pgbench processes (tpcb-like, CLIENTS
sessions each, per-transaction logs) write through them for DURATION seconds; a third of the way
in, `switchyard phase --to cutover --force` moves the writes to NEW; two thirds in, `--to
read_shift` moves them back (the rails are forced: the tables were not backfilled by Switchyard
and the unconfigured-writes window is not observed in a short run).

Reported per move: how long the barrier was open (the command's figure) and how long each proxy
held new transactions (`switchyard_cutover_pause_seconds`); over the whole run: TPS, p50/p99 and
maximum transaction latency, and the longest stall (the largest gap between two consecutive
transaction completions across all sessions of both pgbench processes). The target on this
machine is a stall under 100 ms. A failed transaction (pgbench counts them) makes the exit
status 1.

Standard library only. Loopback only; every run bounded by its duration.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import dual_write
from dual_write import Proxy
from pglocal import HOST, USER, drop_databases, env, log, pg_env, pgbench_databases

OLD_DB = "switchyard_co_old"
NEW_DB = "switchyard_co_new"
REPO = Path(__file__).resolve().parents[2]


def parse_args():
    e = env
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pg-port", type=int, default=int(e("PG_PORT", "5432")))
    p.add_argument("--scale", type=int, default=int(e("SCALE", "5")))
    p.add_argument("--clients", type=int, default=int(e("CLIENTS", "4")))
    p.add_argument("--duration", type=int, default=int(e("DURATION", "24")))
    p.add_argument("--proxy-workers", type=int, default=int(e("PROXY_WORKERS", "1")))
    p.add_argument("--port", type=int, default=int(e("PROXY_PORT", "6481")))
    p.add_argument("--bin", default=e("SWITCHYARD_BIN", str(REPO / "target/release/switchyard")))
    p.add_argument("--keep", action="store_true", help="keep the databases")
    a = p.parse_args()
    a.new_port = a.pg_port
    a.threads = 1
    return a


def pause_seconds(admin_port):
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/status", timeout=5) as r:
        return json.load(r)["authority"]["last_pause_seconds"]


def main():
    a = parse_args()
    if not Path(a.bin).exists():
        raise SystemExit(f"{a.bin} missing: cargo build --release -p switchyard")
    work = Path(tempfile.mkdtemp(prefix="switchyard-co-bench-"))
    proxies = []
    try:
        pgbench_databases(a.pg_port, (OLD_DB, NEW_DB), a.scale)
        dual_write.OLD_DB, dual_write.NEW_DB = OLD_DB, NEW_DB
        for i in range(2):
            px = Proxy(f"proxy{i}", a, work, "dual_write", a.port + 2 * i, a.port + 2 * i + 1)
            px.admin_port = a.port + 2 * i + 1
            px.cfg.write_text(px.cfg.read_text() + "[control]\npoll_interval_ms = 200\n")
            proxies.append(px)
        cfg = str(proxies[0].cfg)

        def cli(*args, timeout=120):
            r = subprocess.run([a.bin, *args, "--config", cfg], capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise SystemExit(f"switchyard {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
            return r.stdout

        cli("prepare")
        for t in dual_write.TABLES:
            cli("phase", "--table", f"public.{t}", "--to", "read_shift")
        for px in proxies:
            px.start()
        log(f"scale={a.scale} clients={a.clients}x2 duration={a.duration}s")
        benches = []
        for i, px in enumerate(proxies):
            cmd = ["pgbench", "-h", HOST, "-p", str(px.port), "-U", USER, "-n", "-c", str(a.clients), "-j", "1",
                   "-T", str(a.duration), "-M", "prepared", "-l", "--log-prefix", str(work / f"log{i}"), OLD_DB]
            benches.append(subprocess.Popen(cmd, env=pg_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True, start_new_session=True))
        moves = []
        started = time.time()
        for frac, to in ((1 / 3, "cutover"), (2 / 3, "read_shift")):
            time.sleep(max(0.0, started + a.duration * frac - time.time()))
            at = time.time()
            out = json.loads(cli("phase", "--table", "public.pgbench_accounts", "--to", to, "--force", "--json"))
            time.sleep(1.0)
            moves.append((to, at - started, out["barrier_seconds"], [pause_seconds(px.admin_port) for px in proxies]))
            log(f"{to}: under the barrier " + ", ".join(f"{s['step']} {s['ms']:.0f} ms" for s in out.get("steps", [])))
        outputs = [b.communicate(timeout=a.duration + 60)[0] for b in benches]
        failed = sum(int(line.split(":")[1].split()[0]) for o in outputs for line in o.splitlines()
                     if line.startswith("number of failed transactions"))
        ends, lats = [], []
        for f in work.glob("log*"):
            for line in f.read_text().split("\n"):
                parts = line.split()
                if len(parts) >= 6:
                    lats.append(int(parts[2]) / 1000.0)
                    ends.append(int(parts[4]) + int(parts[5]) / 1e6)
        ends.sort()
        lats.sort()
        gaps = [(b - a_) * 1000.0 for a_, b in zip(ends, ends[1:])]
        longest = max(gaps) if gaps else None
        pct = lambda q: lats[min(len(lats) - 1, int(q * len(lats)))] if lats else None
        tps = len(ends) / a.duration
        log(f"{'move':<11} {'at s':>6} {'barrier s':>10} {'held s (proxy 0, 1)':>22}")
        for to, at, barrier, held in moves:
            log(f"{to:<11} {at:>6.1f} {barrier:>10.3f} {held[0]:>10.3f} {held[1]:>10.3f}")
        log(f"transactions {len(ends)} ({tps:.0f}/s), failed {failed}; latency p50 {pct(0.5):.2f} ms, "
            f"p99 {pct(0.99):.2f} ms, max {lats[-1]:.1f} ms; longest stall {longest:.1f} ms")
        print(f"RESULT cutover longest_stall_ms={longest:.1f} max_latency_ms={lats[-1]:.1f} p99_ms={pct(0.99):.2f} "
              f"tps={tps:.0f} barrier_s={moves[0][2]:.3f},{moves[1][2]:.3f} failed={failed} target_stall_ms=100")
        return 1 if failed else 0
    finally:
        for px in proxies:
            try:
                px.stop()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        if not a.keep:
            drop_databases(a.pg_port, (OLD_DB, NEW_DB))


if __name__ == "__main__":
    sys.exit(main())
