"""Helpers that the system benchmarks share: options from the environment, logging, running
PostgreSQL's client programs against the local server (loopback only, user postgres, no
password, no SSL), and the small formatting and statistics helpers of their reports (also used
by pgbench.py). Standard library only."""

import os
import socket
import statistics
import subprocess

HOST = "127.0.0.1"
USER = "postgres"


def env(name, default):
    return os.environ.get(name, default)


def log(msg):
    print(msg, flush=True)


def pg_env():
    """The environment for psql, pgbench and pg_dump: none of the caller's PG* settings that
    would point them elsewhere."""
    e = dict(os.environ)
    for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGSERVICE", "PGOPTIONS"):
        e.pop(k, None)
    e.update(PGUSER=USER, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    return e


def run(cmd, timeout=600, check=True, **kw):
    r = subprocess.run(cmd, env=pg_env(), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
    return r


def psql(port, db, sql, timeout):
    """One SQL string through psql; its unaligned, tuples-only output."""
    return run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(port),
                "-U", USER, "-d", db, "-c", sql], timeout=timeout).stdout.strip()


def port_open(port, timeout=0.5):
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def ratio(x, y):
    return None if x is None or y in (None, 0) else x / y


def median_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pgbench_databases(port, dbs, scale):
    """Drops and creates each of `dbs` on the local server, fills it with `pgbench -i -s scale`
    and analyzes it."""
    for db in dbs:
        psql(port, "postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)", 600)
        psql(port, "postgres", f"CREATE DATABASE {db}", 600)
        run(["pgbench", "-h", HOST, "-p", str(port), "-U", USER, "-i", "-q", "-s", str(scale), db], timeout=1800)
        psql(port, db, "VACUUM ANALYZE", 600)


def drop_databases(port, dbs):
    """Drops `dbs` (at exit: errors are ignored)."""
    for db in dbs:
        subprocess.run(["psql", "-X", "-q", "-h", HOST, "-p", str(port), "-U", USER, "-d", "postgres",
                        "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], capture_output=True, timeout=120)
