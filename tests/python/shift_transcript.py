"""Read-shift driver transcripts: what psycopg 3 and asyncpg return for reads of a migrated
table, printed as one JSON document, so the caller can compare a proxy whose reads come from
OLD with one whose reads come from NEW (tests/tests/read_shift_drivers.rs).

    python3 shift_transcript.py DSN

The DSN points at a proxy whose database has table `items` (id int, name text, feeling mood,
at timestamptz, d date, span interval, ratio float8, price numeric, tags text[]) with the enum
`mood`. Sessions run under non-default TimeZone, DateStyle, IntervalStyle and
extra_float_digits, set at startup and by SET. Only reads of `items` are sent (and the
drivers' own catalog queries): the data on both stores stays the same.

Not collected by pytest (the name does not start with test_).
"""

from __future__ import annotations

import asyncio
import json
import sys

import asyncpg
import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.types.string import TextLoader
from psycopg.types.enum import EnumInfo, register_enum

from sy_helpers import CONNECT_TIMEOUT, asyncpg_params

COLUMNS = "id, name, feeling, at, d, span, ratio, price, tags"
STARTUP = {
    "TimeZone": "America/Sao_Paulo",
    "DateStyle": "German, DMY",
    "IntervalStyle": "postgres_verbose",
    "extra_float_digits": "0",
}


def show(value):
    """A value as a stable string: its Python type and repr."""
    return f"{type(value).__name__}:{value!r}"


def rows_of(cur) -> dict:
    desc = [(c.name, c.type_code) for c in cur.description] if cur.description else None
    fmts = [cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)] if cur.pgresult else []
    return {"desc": desc, "formats": fmts, "rows": [[show(v) for v in r] for r in cur.fetchall()]}


def psycopg_transcript(dsn: str) -> dict:
    options = " ".join(f"-c {k}={v.replace(' ', chr(92) + ' ')}" for k, v in STARTUP.items())
    out: dict = {}
    with psycopg.connect(
        make_conninfo(dsn, options=options, connect_timeout=CONNECT_TIMEOUT), autocommit=True
    ) as conn:
        # psycopg parses dates in text only in DateStyle ISO: keep their text as the server
        # wrote it (which shows the session's DateStyle and TimeZone were applied).
        for name in ("timestamptz", "timestamp", "date", "interval"):
            conn.adapters.register_loader(name, TextLoader)
        # Text, no parameters; then with parameters, prepared on the server.
        out["text"] = rows_of(conn.execute(f"select {COLUMNS} from items where id <= 5 order by id"))
        out["prepared"] = [
            rows_of(conn.execute(f"select {COLUMNS} from items where id = %s", (i,), prepare=True))
            for i in range(1, 8)
        ]
        # Binary results: the enum arrives as bytes (psycopg knows no loader for it yet).
        cur = conn.cursor(binary=True)
        cur.execute(f"select {COLUMNS} from items where id between %s and %s order by id", (3, 6))
        out["binary"] = rows_of(cur)
        # The enum registered by its (OLD's) id: values load as Python enum members only if
        # the ids in the reads' descriptions are the ones the catalog gave.
        info = EnumInfo.fetch(conn, "mood")
        register_enum(info, conn)
        out["enum_oid_is_catalogs"] = info.oid
        out["enum_text"] = rows_of(conn.execute("select id, feeling from items where feeling = %s order by id", ("ok",)))
        cur = conn.cursor(binary=True)
        cur.execute("select id, feeling, tags from items where id < %s order by id", (6,), prepare=True)
        out["enum_binary"] = rows_of(cur)
        # A session setting changed by SET after startup.
        conn.execute("set TimeZone = 'Asia/Kolkata'")
        conn.execute("set DateStyle = 'SQL, MDY'")
        out["after_set"] = rows_of(conn.execute("select id, at, d, at::text from items where id in (1, 2) order by id"))
        # Pipelines: several batches in flight, some run on OLD (fine), none may fail.
        with conn.pipeline() as p:
            curs = [conn.execute("select id, feeling, at from items where id = %s", (i,)) for i in range(1, 6)]
            p.sync()
            curs += [conn.execute("select count(*), min(at), max(span) from items where feeling = %s", (m,), prepare=True) for m in ("sad", "ok", "happy")]
            curs.append(conn.execute("select name, ratio from items where id = 7"))
        out["pipeline"] = [rows_of(c) for c in curs]
        with conn.pipeline():
            curs = [conn.execute("select id, price, tags from items where id = %s", (i,), prepare=True) for i in range(10, 16)]
        out["pipeline_prepared"] = [rows_of(c) for c in curs]
        out["settings"] = conn.execute(
            "select current_setting('TimeZone'), current_setting('DateStyle'), "
            "current_setting('IntervalStyle'), current_setting('extra_float_digits')"
        ).fetchone()
    return out


def record(r) -> list:
    return [show(v) for v in r.values()]


async def asyncpg_transcript(dsn: str) -> dict:
    out: dict = {}
    conn = await asyncpg.connect(**asyncpg_params(dsn, **STARTUP))
    try:
        # asyncpg reads results in binary; it learns the enum by its id from pg_type (on OLD).
        out["fetch"] = [record(r) for r in await conn.fetch(f"select {COLUMNS} from items where id = any($1::int[]) order by id", [1, 2, 3, 4])]
        stmt = await conn.prepare(f"select {COLUMNS}, feeling::text as feeling_text from items where id = $1")
        out["attributes"] = [(a.name, a.type.oid, a.type.name, a.type.kind, a.type.schema) for a in stmt.get_attributes()]
        out["parameters"] = [(p.oid, p.name) for p in stmt.get_parameters()]
        out["reused"] = [record(await stmt.fetchrow(i)) for i in range(1, 21)]
        # The enum as a parameter (ParameterDescription names it) and in text.
        by_mood = await conn.prepare("select id, feeling, feeling::text from items where feeling = $1 order by id")
        out["enum_parameter"] = [(p.oid, p.name, p.kind) for p in by_mood.get_parameters()]
        out["by_mood"] = {m: [record(r) for r in await by_mood.fetch(m)] for m in ("sad", "ok", "happy")}
        # The enum in text format, by a codec asyncpg is told to use.
        await conn.set_type_codec("mood", encoder=str, decoder=lambda s: f"text:{s}", format="text")
        out["enum_codec_text"] = [record(r) for r in await conn.fetch("select id, feeling from items where id <= $1 order by id", 5)]
        out["fetchval"] = show(await conn.fetchval("select sum(ratio) from items where id > $1", 3))
        await conn.execute("set TimeZone = 'Pacific/Auckland'")
        out["text_values"] = [record(r) for r in await conn.fetch("select at::text, d::text, span::text, ratio::text from items where id <= $1 order by id", 3)]
        out["settings"] = record(await conn.fetchrow(
            "select current_setting('TimeZone'), current_setting('DateStyle'), "
            "current_setting('IntervalStyle'), current_setting('extra_float_digits')"
        ))
    finally:
        await conn.close()
    return out


async def bounded(coro, seconds: float):
    return await asyncio.wait_for(coro, seconds)


def main() -> None:
    dsn = sys.argv[1]
    out = {
        "psycopg": psycopg_transcript(dsn),
        "asyncpg": asyncio.run(bounded(asyncpg_transcript(dsn), 60)),
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True, default=str)


if __name__ == "__main__":
    main()
