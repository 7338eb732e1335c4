#!/usr/bin/env python3
"""Backfill benchmark: `switchyard backfill` rows/s vs a plain psql COPY pipe, same databases.

Creates OLD (switchyard_bf_old) and NEW (switchyard_bf_new) on the local PostgreSQL,
the same table on both, ROWS rows in OLD, runs `switchyard prepare` (table in
dual_write), then per round, each time into an emptied NEW table (same indexes):

  pipe      psql -c "COPY bench TO STDOUT" OLD | psql -c "COPY bench FROM STDIN" NEW
  backfill  switchyard backfill --workers W --chunk-rows C (fencing on: rows with a
            record are left out, then a tombstone sweep under the fence lock)
  mirrored  the same backfill after 1% of the keys, spread over the whole range, got
            a mirrored write on NEW first, so every chunk reads its records and leaves
            those keys out of its read from OLD

The order rotates each round. Times are wall clock from process start to exit.
Prints each run, the medians, the ratio backfill/pipe (target >= 0.8) and the load
average, and checks after the last backfill that NEW equals OLD.

Standard library only. Environment / flags: ROWS (1000000), ROUNDS (3), WORKERS (4),
CHUNK_ROWS (10000), PG_PORT (5432), SWITCHYARD_BIN (target/release/switchyard, built
if missing), KEEP_DB. Loopback only; every step has a timeout.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pglocal import HOST, USER, env, log, pg_env, psql as _psql, run

OLD_DB = "switchyard_bf_old"
NEW_DB = "switchyard_bf_new"
REPO = Path(__file__).resolve().parents[2]
TABLE = """CREATE TABLE bench (
    id bigint PRIMARY KEY,
    account integer NOT NULL,
    amount numeric(12,2) NOT NULL,
    note text,
    created timestamptz NOT NULL DEFAULT now()
)"""
KEYS = "switchyard.switchyard_keys_public_bench"


def psql(a, db, sql):
    """psql on the local server at `a.pg_port`; filling a million rows may take minutes."""
    return _psql(a.pg_port, db, sql, timeout=600)


def load():
    return "%.2f %.2f %.2f" % os.getloadavg()


def empty_new(a):
    """NEW's table and the backfill's state emptied; a checkpoint so no run pays for another's."""
    psql(a, NEW_DB, f"TRUNCATE bench; TRUNCATE {KEYS}; "
                    "DELETE FROM switchyard.switchyard_backfill_chunks; "
                    "DELETE FROM switchyard.switchyard_backfill_tables")
    psql(a, NEW_DB, "CHECKPOINT")
    psql(a, OLD_DB, "CHECKPOINT")


def time_pipe(a):
    empty_new(a)
    base = ["psql", "-X", "-q", "-h", HOST, "-p", str(a.pg_port), "-U", USER]
    start = time.monotonic()
    out = subprocess.Popen(base + ["-d", OLD_DB, "-c", "COPY bench TO STDOUT"], env=pg_env(),
                           stdout=subprocess.PIPE)
    into = subprocess.run(base + ["-d", NEW_DB, "-v", "ON_ERROR_STOP=1", "-c", "COPY bench FROM STDIN"],
                          env=pg_env(), stdin=out.stdout, capture_output=True, text=True, timeout=600)
    out.stdout.close()
    out.wait(timeout=600)
    took = time.monotonic() - start
    if into.returncode != 0 or out.returncode != 0:
        raise SystemExit(f"pipe failed: {into.stderr}")
    n = int(psql(a, NEW_DB, "SELECT count(*) FROM bench"))
    if n != a.rows:
        raise SystemExit(f"pipe copied {n} rows, expected {a.rows}")
    return took


def time_backfill(a, config, mirrored):
    empty_new(a)
    if mirrored:
        # 1% of the keys, every 100th, as a mirrored upsert leaves them: the row and a version-1
        # record. Every chunk then has records in its range.
        psql(a, NEW_DB, f"INSERT INTO bench (id, account, amount, note) SELECT g, g % 10007, "
                        f"(g % 100000) / 100.0, md5(g::text) FROM generate_series(100, {a.rows}, 100) g; "
                        f"INSERT INTO {KEYS} (id, sy_version, sy_deleted) "
                        f"SELECT g, 1, false FROM generate_series(100, {a.rows}, 100) g")
    cmd = [a.bin, "backfill", "--config", config, "--workers", str(a.workers),
           "--chunk-rows", str(a.chunk_rows), "--json"]
    start = time.monotonic()
    r = subprocess.run(cmd, env=pg_env(), capture_output=True, text=True, timeout=1800)
    took = time.monotonic() - start
    if r.returncode != 0:
        raise SystemExit(f"backfill failed ({r.returncode}): {r.stderr[-2000:]}")
    summary = json.loads(r.stdout)
    t = summary["tables"][0]["this_run"]
    expect_skipped = a.rows // 100 if mirrored else 0
    if t["rows_read"] != a.rows or t["rows_skipped"] != expect_skipped:
        raise SystemExit(f"backfill summary off: {t}")
    return took


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=int(env("ROWS", "1000000")))
    p.add_argument("--rounds", type=int, default=int(env("ROUNDS", "3")))
    p.add_argument("--workers", type=int, default=int(env("WORKERS", "4")))
    p.add_argument("--chunk-rows", type=int, default=int(env("CHUNK_ROWS", "10000")))
    p.add_argument("--pg-port", type=int, default=int(env("PG_PORT", "5432")))
    p.add_argument("--bin", default=env("SWITCHYARD_BIN", str(REPO / "target/release/switchyard")))
    a = p.parse_args()
    if not Path(a.bin).exists():
        log(f"{a.bin} missing: cargo build --release ...")
        subprocess.run(["cargo", "build", "--release"], cwd=str(REPO), check=True, timeout=1800)

    log(f"load average at start: {load()} ({os.cpu_count()} CPUs)")
    for db in (OLD_DB, NEW_DB):
        psql(a, "postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        psql(a, "postgres", f"CREATE DATABASE {db}")
        psql(a, db, TABLE)
    log(f"filling OLD with {a.rows} rows ...")
    psql(a, OLD_DB, f"INSERT INTO bench (id, account, amount, note) SELECT g, g % 10007, "
                    f"(g % 100000) / 100.0, md5(g::text) FROM generate_series(1, {a.rows}) g")
    psql(a, OLD_DB, "VACUUM ANALYZE bench")
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
name = "bench"
phase = "dual_write"
""")
    cfg.close()
    try:
        r = run([a.bin, "prepare", "--config", cfg.name], check=False)
        if r.returncode != 0:
            raise SystemExit(f"prepare failed: {r.stdout}{r.stderr}")
        kinds = ["pipe", "backfill", "mirrored"]
        times = {k: [] for k in kinds}
        for rnd in range(a.rounds):
            order = kinds[rnd % 3:] + kinds[:rnd % 3]
            for k in order:
                if k == "pipe":
                    took = time_pipe(a)
                else:
                    took = time_backfill(a, cfg.name, k == "mirrored")
                times[k].append(took)
                log(f"round {rnd + 1} {k:9} {took:7.2f} s  {a.rows / took:10.0f} rows/s   (load {load()})")
        # The last backfill's result must equal OLD.
        time_backfill(a, cfg.name, False)
        digest = "SELECT md5(string_agg(b::text, ',' ORDER BY id)) FROM bench b"
        if psql(a, OLD_DB, digest) != psql(a, NEW_DB, digest):
            raise SystemExit("NEW differs from OLD after the backfill")
        med = {k: statistics.median(v) for k, v in times.items()}
        log("")
        log(f"rows {a.rows}, workers {a.workers}, chunk rows {a.chunk_rows}, rounds {a.rounds}")
        for k in kinds:
            log(f"  {k:9} median {med[k]:6.2f} s  {a.rows / med[k]:10.0f} rows/s")
        ratio = med["pipe"] / med["backfill"]
        ratio_m = med["pipe"] / med["mirrored"]
        log(f"RESULT backfill/pipe = {ratio:.2f}x (target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'}); "
            f"with mirrored keys in every chunk = {ratio_m:.2f}x; load average at end {load()}")
    finally:
        os.unlink(cfg.name)
        if not os.environ.get("KEEP_DB"):
            for db in (OLD_DB, NEW_DB):
                run(["psql", "-X", "-q", "-h", HOST, "-p", str(a.pg_port), "-U", USER, "-d", "postgres",
                     "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], check=False)


if __name__ == "__main__":
    sys.exit(main())
