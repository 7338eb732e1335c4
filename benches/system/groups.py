#!/usr/bin/env python3
"""Table groups benchmark: what it costs a session to run each transaction where its group's
writes are, while the groups are split between OLD and NEW.

OLD (switchyard_gr_old) and NEW (switchyard_gr_new) are databases on the local server, both with
`pgbench -i -s SCALE` (equal data). One proxy serves them with two table groups: `accounts`
(pgbench_accounts) and `tellers` (pgbench_tellers); both start in read_shift. pgbench runs two
scripts with equal weights, each a transaction on one group opened with its own BEGIN
(`BEGIN; UPDATE ...; SELECT ...; END;`), so a session's next transaction is on the other group
half of the time. Rounds alternate, in one run:

- `together`: both groups' writes on OLD (no session moves);
- `split`: `accounts` cut over to NEW, `tellers` on OLD: about every other transaction moves its
  session to the other store (settings and prepared statements given to its connection there).

Reported per state (medians over rounds): TPS, p50/p99 latency, and CPU µs per committed
transaction of the proxy, OLD's server and NEW's server (both are the same local server here,
so their sum is reported as `stores`). Moving between the states goes through the barrier
(`switchyard phase --force`; the rails are forced: no backfill or drift result in a short run).

Standard library only. Loopback only; every run bounded by its duration.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dual_write
from dual_write import Proxy, postmaster_pid
from pglocal import drop_databases, env, log, median_or_none, pgbench_databases, ratio

OLD_DB = "switchyard_gr_old"
NEW_DB = "switchyard_gr_new"
REPO = Path(__file__).resolve().parents[2]

SCRIPTS = {
    "accounts.sql": "\\set aid random(1, 100000 * :scale)\n"
                    "BEGIN;\n"
                    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n"
                    "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
                    "END;\n",
    "tellers.sql": "\\set tid random(1, 10 * :scale)\n"
                   "BEGIN;\n"
                   "UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = :tid;\n"
                   "SELECT tbalance FROM pgbench_tellers WHERE tid = :tid;\n"
                   "END;\n",
}


def parse_args():
    e = env
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pg-port", type=int, default=int(e("PG_PORT", "5432")))
    p.add_argument("--scale", type=int, default=int(e("SCALE", "5")))
    p.add_argument("--clients", type=int, default=int(e("CLIENTS", "8")))
    p.add_argument("--duration", type=int, default=int(e("DURATION", "10")))
    p.add_argument("--rounds", type=int, default=int(e("ROUNDS", "3")))
    p.add_argument("--mode", default=e("MODE", "prepared"), choices=["simple", "extended", "prepared"])
    p.add_argument("--proxy-workers", type=int, default=int(e("PROXY_WORKERS", "1")))
    p.add_argument("--port", type=int, default=int(e("PROXY_PORT", "6491")))
    p.add_argument("--bin", default=e("SWITCHYARD_BIN", str(REPO / "target/release/switchyard")))
    p.add_argument("--keep", action="store_true", help="keep the databases")
    a = p.parse_args()
    a.new_port = a.pg_port
    a.threads = 2
    return a


def main():
    a = parse_args()
    if not Path(a.bin).exists():
        raise SystemExit(f"{a.bin} missing: cargo build --release -p switchyard")
    work = Path(tempfile.mkdtemp(prefix="switchyard-gr-bench-"))
    px = None
    try:
        pgbench_databases(a.pg_port, (OLD_DB, NEW_DB), a.scale)
        dual_write.OLD_DB, dual_write.NEW_DB = OLD_DB, NEW_DB
        px = Proxy("proxy", a, work, "read_shift", a.port, a.port + 1)
        # Only the two tables, each its own group.
        head = px.cfg.read_text().split("[[tables]]")[0]
        # LOG_LEVEL: the proxy's log filter (its log is in the work directory; --keep keeps both).
        head = head.replace('log_level = "warn"', f'log_level = "{env("LOG_LEVEL", "warn")}"')
        px.cfg.write_text(head + "[control]\npoll_interval_ms = 200\n\n"
                          "[[tables]]\nname = \"public.pgbench_accounts\"\nphase = \"read_shift\"\ngroup = \"accounts\"\n\n"
                          "[[tables]]\nname = \"public.pgbench_tellers\"\nphase = \"read_shift\"\ngroup = \"tellers\"\n")
        cfg = str(px.cfg)

        def cli(*args, timeout=120):
            r = subprocess.run([a.bin, *args, "--config", cfg], capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise SystemExit(f"switchyard {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
            return r.stdout

        cli("prepare")
        px.start()
        for name, text in SCRIPTS.items():
            (work / name).write_text(text)
        script_args = ("-f", str(work / "accounts.sql"), "-f", str(work / "tellers.sql"))
        pm = postmaster_pid(a.pg_port)
        log(f"scale={a.scale} clients={a.clients} mode={a.mode} duration={a.duration}s rounds={a.rounds}")
        runs = {"together": [], "split": []}
        state = "together"
        for r in range(a.rounds):
            for want in ("together", "split"):
                if want != state:
                    to = "cutover" if want == "split" else "read_shift"
                    cli("phase", "--table", "public.pgbench_accounts", "--to", to, "--force", "--json")
                    time.sleep(1.5)
                    state = want
                groups = {"proxy": ({px.pid}, None), "stores": (set(), pm)}
                res = dual_write.pgbench(a, a.port, a.mode, a.duration, work, groups=groups,
                                         script_args=script_args)
                cpu = res["cpu"] or {}
                runs[want].append({"tps": res["tps"], "p50": res["p50"], "p99": res["p99"], "failed": res["failed"],
                                   "proxy": cpu.get("proxy"), "stores": cpu.get("stores")})
                log(f"round {r + 1} {want:<9} tps {res['tps']:8.0f}  p50 {res['p50']:.2f} ms  p99 {res['p99']:.2f} ms  "
                    f"proxy {cpu.get('proxy', 0):6.1f} µs/txn  stores {cpu.get('stores', 0):6.1f} µs/txn  "
                    f"failed {res['failed']}")
        if state == "split":
            cli("phase", "--table", "public.pgbench_accounts", "--to", "read_shift", "--force")
        med = {k: {f: median_or_none([x[f] for x in v]) for f in ("tps", "p50", "p99", "proxy", "stores")}
               for k, v in runs.items()}
        failed = sum(x["failed"] for v in runs.values() for x in v)
        log(f"{'state':<9} {'tps':>8} {'p50 ms':>8} {'p99 ms':>8} {'proxy µs':>9} {'stores µs':>10}")
        for k, m in med.items():
            log(f"{k:<9} {m['tps']:>8.0f} {m['p50']:>8.2f} {m['p99']:>8.2f} {m['proxy']:>9.1f} {m['stores']:>10.1f}")
        t, s = med["together"], med["split"]
        print(f"RESULT groups split/together tps={ratio(s['tps'], t['tps']):.2f} "
              f"proxy_us={t['proxy']:.1f}->{s['proxy']:.1f} stores_us={t['stores']:.1f}->{s['stores']:.1f} "
              f"p99_ms={t['p99']:.2f}->{s['p99']:.2f} failed={failed}")
        return 1 if failed else 0
    finally:
        if px is not None:
            try:
                px.stop()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        if not a.keep:
            drop_databases(a.pg_port, (OLD_DB, NEW_DB))


if __name__ == "__main__":
    sys.exit(main())
