"""TLS login cases for a Python driver, run by tests/tests/tls_drivers.rs.

    python3 tls_python.py psycopg|asyncpg DBNAME CASE...

Each CASE is `name,port,sslmode,rootcert,password,bind` (rootcert `-` for none, bind `1` to
require channel binding). One line is printed per case, tab-separated:

    name  ok     db=<current_database()> tls=<what the driver reports> [cn=<peer CN>]
    name  error  <the driver's error, on one line>

The test decides which outcome each case must have; this program only reports.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from urllib.parse import quote, urlencode

CONNECT_TIMEOUT = 10


@dataclass
class Case:
    name: str
    port: int
    sslmode: str
    rootcert: str | None
    password: str
    bind: bool

    @staticmethod
    def parse(arg: str) -> "Case":
        name, port, sslmode, rootcert, password, bind = arg.split(",")
        return Case(name, int(port), sslmode, None if rootcert == "-" else rootcert, password, bind == "1")


def psycopg_case(db: str, case: Case) -> str:
    import psycopg
    from psycopg.conninfo import make_conninfo

    params = {
        "host": "127.0.0.1",
        "port": case.port,
        "dbname": db,
        "user": "postgres",
        "password": case.password,
        "sslmode": case.sslmode,
        "connect_timeout": CONNECT_TIMEOUT,
    }
    if case.rootcert:
        params["sslrootcert"] = case.rootcert
    if case.bind:
        # libpq then refuses any login that is not SCRAM-SHA-256-PLUS bound to this channel.
        params["channel_binding"] = "require"
    with psycopg.connect(make_conninfo(**params), autocommit=True) as conn:
        (name,) = conn.execute("SELECT current_database()").fetchone()
        return f"db={name} tls={'on' if conn.pgconn.ssl_in_use else 'off'}"


async def asyncpg_case(db: str, case: Case) -> str:
    import asyncpg

    # asyncpg has no channel binding (it only speaks SCRAM-SHA-256): `bind` is ignored.
    query = {"sslmode": case.sslmode}
    if case.rootcert:
        query["sslrootcert"] = case.rootcert
    dsn = f"postgresql://postgres:{quote(case.password)}@127.0.0.1:{case.port}/{db}?{urlencode(query)}"
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        name = await conn.fetchval("SELECT current_database()")
        # asyncpg has no public accessor for the TLS session; its transport has one.
        tls = conn._transport.get_extra_info("ssl_object")
        if tls is None:
            return f"db={name} tls=off"
        shown = f"db={name} tls={tls.version()}"
        # getpeercert() gives the certificate's fields only when it was verified.
        cert = tls.getpeercert()
        if cert:
            cn = [value for rdn in cert["subject"] for key, value in rdn if key == "commonName"]
            shown += f" cn={cn[0] if cn else '-'}"
        return shown
    finally:
        await conn.close()


def main() -> int:
    driver, db, *cases = sys.argv[1:]
    for case in map(Case.parse, cases):
        try:
            if driver == "psycopg":
                shown = psycopg_case(db, case)
            elif driver == "asyncpg":
                shown = asyncio.run(asyncpg_case(db, case))
            else:
                print(f"unknown driver {driver!r}", file=sys.stderr)
                return 2
            print(f"{case.name}\tok\t{shown}", flush=True)
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome to report
            message = " ".join(f"{type(exc).__name__}: {exc}".split())
            print(f"{case.name}\terror\t{message}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
