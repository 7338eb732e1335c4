#!/usr/bin/env python3
"""Drift checker benchmark: `switchyard drift verify` vs a hand-run chunked hash comparison,
and `switchyard drift sample` of 10,000 keys, on the same databases in one run.

Creates OLD (switchyard_dr_old) and NEW (switchyard_dr_new) on the local PostgreSQL with the
same ROWS rows, then changes 5 rows, deletes 5 and adds 5 on NEW (15 differing keys). Per
round, in rotating order:

  handrun  what an operator would script with psql: the md5 of every 10,000-key range
           (md5 of each row's text, in key order) on OLD in one psql session, then on NEW in
           another, then the keys of the ranges that differ read on both sides and compared
  verify   switchyard drift verify --chunk-rows 10000 --json
  sample   switchyard drift sample --samples 10000 --seed ROUND --json

Both comparisons must find exactly the 15 keys. Prints each run, the medians, the ratio
handrun/verify (target >= 1.5), and the sample's time and interval width.

Standard library only. Environment / flags: ROWS (1000000), ROUNDS (3), PG_PORT (5432),
SWITCHYARD_BIN (target/release/switchyard, built if missing). Loopback only; every step has a
timeout.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pglocal import HOST, USER, env, log, pg_env, psql as _psql

OLD_DB = "switchyard_dr_old"
NEW_DB = "switchyard_dr_new"
REPO = Path(__file__).resolve().parents[2]
CHUNK = 10_000
TABLE = """CREATE TABLE bench (
    id bigint PRIMARY KEY,
    account integer NOT NULL,
    amount numeric(12,2) NOT NULL,
    note text,
    created timestamptz NOT NULL DEFAULT '2026-01-01'
)"""


def psql(a, db, sql, timeout=900):
    return _psql(a.pg_port, db, sql, timeout=timeout)


def handrun(a):
    """Range hashes on each side (one psql session per side), then the differing ranges key by
    key. Returns the differing keys."""
    ranges = [(lo, lo + CHUNK) for lo in range(0, a.rows + CHUNK, CHUNK)]
    script = "\n".join(
        f"SELECT {lo}, count(*), md5(string_agg(md5(t::text), '' ORDER BY id)) FROM bench t "
        f"WHERE id > {lo} AND id <= {hi};" for lo, hi in ranges)
    hashes = {}
    for db in (OLD_DB, NEW_DB):
        # One line per range, "lo|count|hash" (the hash empty for an empty range).
        hashes[db] = {int(line.split("|")[0]): line for line in psql(a, db, script).splitlines()}
    keys = set()
    for lo, hi in ranges:
        if hashes[OLD_DB].get(lo) == hashes[NEW_DB].get(lo):
            continue
        rows = {}
        for db in (OLD_DB, NEW_DB):
            out = psql(a, db, f"SELECT id, md5(t::text) FROM bench t WHERE id > {lo} AND id <= {hi}")
            rows[db] = dict(line.split("|") for line in out.splitlines())
        for k in set(rows[OLD_DB]) | set(rows[NEW_DB]):
            if rows[OLD_DB].get(k) != rows[NEW_DB].get(k):
                keys.add(int(k))
    return keys


def switchyard(a, config, *args):
    r = subprocess.run([a.bin, "drift", *args, "--config", config, "--json"], env=pg_env(),
                       capture_output=True, text=True, timeout=1800)
    if r.returncode not in (0, 1):
        raise SystemExit(f"switchyard drift {args[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=int(env("ROWS", "1000000")))
    p.add_argument("--rounds", type=int, default=int(env("ROUNDS", "3")))
    p.add_argument("--pg-port", type=int, default=int(env("PG_PORT", "5432")))
    p.add_argument("--bin", default=env("SWITCHYARD_BIN", str(REPO / "target/release/switchyard")))
    a = p.parse_args()
    if not Path(a.bin).exists():
        log(f"{a.bin} missing: cargo build --release ...")
        subprocess.run(["cargo", "build", "--release", "-p", "switchyard"], cwd=str(REPO), check=True,
                       timeout=3600)
    log("load average at start: %.2f %.2f %.2f" % os.getloadavg() + f" ({os.cpu_count()} CPUs)")
    for db in (OLD_DB, NEW_DB):
        psql(a, "postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        psql(a, "postgres", f"CREATE DATABASE {db}")
        psql(a, db, TABLE)
        log(f"filling {db} with {a.rows} rows ...")
        psql(a, db, f"INSERT INTO bench (id, account, amount, note) SELECT g, g % 10007, "
                    f"(g % 100000) / 100.0, md5(g::text) FROM generate_series(1, {a.rows}) g")
        psql(a, db, "VACUUM ANALYZE bench")
    step = a.rows // 16
    changed = [step * i for i in range(1, 6)]
    deleted = [step * i + 1 for i in range(6, 11)]
    added = [a.rows + i for i in range(1, 6)]
    psql(a, NEW_DB, f"UPDATE bench SET note = 'changed' WHERE id IN ({','.join(map(str, changed))}); "
                    f"DELETE FROM bench WHERE id IN ({','.join(map(str, deleted))}); "
                    f"INSERT INTO bench (id, account, amount) SELECT g, 0, 0 FROM unnest(ARRAY[{','.join(map(str, added))}]) g")
    truth = set(changed + deleted + added)
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(f"""[old]
url = "postgres://{USER}@{HOST}:{a.pg_port}/{OLD_DB}"
[new]
url = "postgres://{USER}@{HOST}:{a.pg_port}/{NEW_DB}"
[auth]
method = "trust"
[telemetry]
log_level = "warn"
[[tables]]
name = "public.bench"
phase = "dual_write"
""")
    cfg.close()
    times = {"handrun": [], "verify": [], "sample": []}
    widths = []
    try:
        for rnd in range(a.rounds):
            order = ["handrun", "verify", "sample"]
            order = order[rnd % 3:] + order[:rnd % 3]
            for what in order:
                start = time.monotonic()
                if what == "handrun":
                    found = handrun(a)
                    took = time.monotonic() - start
                    if found != truth:
                        raise SystemExit(f"hand-run comparison found {sorted(found)}, expected {sorted(truth)}")
                elif what == "verify":
                    r = switchyard(a, cfg.name, "verify", "--chunk-rows", str(CHUNK))
                    took = time.monotonic() - start
                    found = {int(k["key"][0]) for k in r["differing_keys"]}
                    if found != truth:
                        raise SystemExit(f"verify found {sorted(found)}, expected {sorted(truth)}")
                    log(f"  verify: {r['chunks']} ranges from {r.get('ranges_from')}, {r['rows_per_sec']:.0f} rows/s")
                else:
                    r = switchyard(a, cfg.name, "sample", "--samples", "10000", "--seed", str(rnd))
                    took = time.monotonic() - start
                    widths.append(r["ci95_high"] - r["ci95_low"])
                    log(f"  sample: {r['sampled']} keys, {r['differing']} differing, rate {r['rate']:.6f} "
                        f"[{r['ci95_low']:.6f}, {r['ci95_high']:.6f}]")
                times[what].append(took)
                log(f"round {rnd + 1} {what:8s} {took:7.2f} s   (load {os.getloadavg()[0]:.2f})")
    finally:
        os.unlink(cfg.name)
        for db in (OLD_DB, NEW_DB):
            psql(a, "postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    med = {k: statistics.median(v) for k, v in times.items()}
    log(f"\nmedians over {a.rounds} rounds, {a.rows} rows per store, 15 differing keys found by both:")
    log(f"  hand-run chunked md5 (psql) {med['handrun']:7.2f} s")
    log(f"  switchyard drift verify     {med['verify']:7.2f} s   "
        f"ratio hand-run/verify {med['handrun'] / med['verify']:.2f}x (target >= 1.5x)")
    log(f"  switchyard drift sample     {med['sample']:7.2f} s   (10,000 keys; 95% interval width "
        f"{statistics.median(widths):.6f})")


if __name__ == "__main__":
    main()
