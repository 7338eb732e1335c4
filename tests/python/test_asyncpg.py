"""asyncpg through the proxy must behave exactly like asyncpg against PostgreSQL.

asyncpg always uses the extended protocol, named prepared statements (its
statement cache), binary formats for parameters and results, and pipelined
Bind/Execute batches in executemany. Every scenario runs on both targets and
the outcomes are compared.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import io
import json
import time
import uuid

import asyncpg
import pytest

from sy_helpers import TARGETS, run_async


async def on_both(apg_params, fn, **settings):
    out = {}
    for target in TARGETS:
        conn = await asyncpg.connect(**apg_params(target, **settings))
        try:
            out[target] = await fn(conn)
        finally:
            await conn.close(timeout=5)
    return out


def assert_same(results: dict):
    assert results["proxy"] == results["direct"]
    return results["direct"]


def plain(rows):
    """asyncpg Records -> tuples (nested records too), comparable and printable."""

    def conv(v):
        if isinstance(v, asyncpg.Record):
            return tuple(conv(x) for x in v.values())
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, tuple):
            return tuple(conv(x) for x in v)
        if isinstance(v, (decimal.Decimal, float)) and v != v:
            return "NaN"  # NaN != NaN would make equal results compare unequal
        return v

    return [conv(r) for r in rows]


def attrs(stmt):
    return [(a.name, a.type.oid, a.type.name, a.type.kind) for a in stmt.get_attributes()]


TYPES_QUERY = """
select
  1::int2 as i2, (-2147483648)::int4 as i4, 9223372036854775807::int8 as i8,
  12345678901234567890.000000000123::numeric as num, 'NaN'::numeric as num_nan,
  (-0.5)::numeric(10, 3) as num_scaled,
  1.5::float4 as f4, (-2.25e100)::float8 as f8, 'Infinity'::float8 as f8_inf,
  'plain text ü €'::text as t, 'vc'::varchar(10) as vc, 'c'::char(3) as ch, 'nm'::name as nm,
  '\\x00ff10'::bytea as ba, ''::bytea as ba_empty, true as b_t, false as b_f,
  '2024-02-29'::date as d, 'infinity'::date as d_inf,
  '2024-02-29 23:59:59.999999'::timestamp as ts,
  '1999-12-31 23:00:00-05'::timestamptz as tstz,
  '13:14:15.5'::time as tm,
  '1 year 2 mons 3 days 04:05:06.789'::interval as iv, '-1 day'::interval as iv_neg,
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid as u,
  '{"a": 1, "b": [true, null, "x"]}'::json as j, '{"z": {"y": 1.5}}'::jsonb as jb,
  array[1, 2, null, 4]::int4[] as arr_i, array['a', null, 'c''d']::text[] as arr_t,
  array[[1, 2], [3, 4]]::int8[] as arr_2d, '{}'::int4[] as arr_empty,
  array['2024-01-01'::date] as arr_d, array[1.5, null]::numeric[] as arr_n,
  row(1, 'x', null::int, array[1]) as rec,
  '192.168.1.0/24'::cidr as cidr, '10.1.2.3'::inet as inet,
  null::int as n_int, null::text as n_text
"""


def test_fetch_many_types(apg_params):
    async def run(conn):
        stmt = await conn.prepare(TYPES_QUERY)
        rows = await stmt.fetch()
        return attrs(stmt), plain(rows)

    desc, rows = assert_same(run_async(on_both(apg_params, run)))
    r = dict(zip([d[0] for d in desc], rows[0]))
    assert r["i8"] == 2**63 - 1
    assert r["num"] == decimal.Decimal("12345678901234567890.000000000123")
    assert r["ba"] == b"\x00\xff\x10"
    assert r["tstz"] == dt.datetime(2000, 1, 1, 4, 0, tzinfo=dt.timezone.utc)
    assert r["u"] == uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    assert json.loads(r["jb"]) == {"z": {"y": 1.5}}
    assert r["arr_2d"] == [[1, 2], [3, 4]]
    assert r["rec"] == (1, "x", None, [1])
    assert r["n_int"] is None


def test_composite_and_enum_types_roundtrip(apg_params, uniq, cleanup):
    typ, enum, table = f"{uniq}_pt", f"{uniq}_mood", f"{uniq}_tbl"
    cleanup(f"drop type if exists {typ}")
    cleanup(f"drop type if exists {enum}")
    cleanup(f"drop table if exists {table}")

    async def setup():
        conn = await asyncpg.connect(**apg_params("direct"))
        try:
            await conn.execute(f"create type {typ} as (x int, label text, tags text[])")
            await conn.execute(f"create type {enum} as enum ('sad', 'ok', 'happy')")
            await conn.execute(f"create table {table} (id serial primary key, p {typ}, ps {typ}[], m {enum}, src text)")
        finally:
            await conn.close()

    run_async(setup())

    async def run_target(conn, target):
        await conn.executemany(
            f"insert into {table} (p, ps, m, src) values ($1, $2, $3, $4)",
            [
                ((1, "one", ["a", "b"]), [(2, "two", None), None], "ok", target),
                ((None, None, None), [], "happy", target),
                (None, None, None, target),
            ],
        )
        stmt = await conn.prepare(f"select p, ps, m, (p).label from {table} where src = $1 order by id")
        return attrs(stmt)[:3], plain(await stmt.fetch(target))

    async def both():
        out = {}
        for target in TARGETS:
            conn = await asyncpg.connect(**apg_params(target))
            try:
                out[target] = await run_target(conn, target)
            finally:
                await conn.close()
        return out

    desc, rows = assert_same(run_async(both()))
    assert rows == [
        ((1, "one", ["a", "b"]), [(2, "two", None), None], "ok", "one"),
        ((None, None, None), [], "happy", None),
        (None, None, None, None),
    ]


def test_binary_parameters_roundtrip(apg_params):
    values = [
        ("int2", 32767),
        ("int4", -7),
        ("int8", -(2**63)),
        ("numeric", decimal.Decimal("-0.000000000000000001")),
        ("float8", 1e-300),
        ("text", "multi\nline\x01 ü"),
        ("bytea", bytes(range(256))),
        ("bool", False),
        ("date", dt.date(1, 1, 1)),
        ("timestamp", dt.datetime(2038, 1, 19, 3, 14, 8, 1)),
        ("timestamptz", dt.datetime(2020, 6, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=-7)))),
        ("interval", dt.timedelta(days=-3, microseconds=5)),
        ("uuid", uuid.uuid4()),
        ("jsonb", json.dumps({"k": "v"})),
        ("int4[]", [[1, None], [3, 4]]),
        ("text[]", ["", None, "NULL", 'q"uote']),
    ]

    async def run(conn):
        out = []
        for typ, v in values:
            stmt = await conn.prepare(f"select $1::{typ}, pg_typeof($1::{typ})::text")
            for _ in range(3):  # reuse the prepared statement
                row = await stmt.fetchrow(v)
            out.append((row[0], row[1]))
        return out

    out = assert_same(run_async(on_both(apg_params, run)))
    for (typ, v), (got, typname) in zip(values, out):
        if typ == "jsonb":
            assert json.loads(got) == json.loads(v)
        elif typ == "timestamptz":
            assert got == v
        else:
            assert got == v, typ


def test_executemany(apg_params):
    async def run(conn):
        await conn.execute("create temp table t (id int primary key, v text, n numeric, ts timestamptz)")
        base = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
        await conn.executemany(
            "insert into t values ($1, $2, $3, $4)",
            [(i, f"v{i}", decimal.Decimal(i) / 4, base + dt.timedelta(minutes=i)) for i in range(1000)],
        )
        await conn.executemany("update t set v = $2 where id = $1", [(i, "upd") for i in range(0, 1000, 10)])
        agg = await conn.fetchrow("select count(*), sum(n), count(*) filter (where v = 'upd'), max(ts) from t")
        # an error in the middle of an executemany batch rolls back the whole batch
        with pytest.raises(asyncpg.UniqueViolationError) as ei:
            await conn.executemany("insert into t (id, v) values ($1, $2)", [(5000, "a"), (5001, "b"), (5, "dup"), (5002, "c")])
        after = await conn.fetchval("select count(*) from t")
        return tuple(agg), ei.value.sqlstate, ei.value.message, after

    agg, state, msg, after = assert_same(run_async(on_both(apg_params, run)))
    assert agg[0] == 1000 and agg[2] == 100
    assert state == "23505" and after == 1000


def test_prepared_statement_reuse(apg_params):
    async def run(conn):
        stmt = await conn.prepare("select $1::int8 * $2::int8 as p, $3::text as t")
        results = []
        for i in range(200):
            results.append(tuple(await stmt.fetchrow(i, i + 1, str(i))))
        vals = [await stmt.fetchval(3, 4, "x", column=0) for _ in range(20)]
        cursor_rows = []
        async with conn.transaction():
            cstmt = await conn.prepare("select g, g::text from generate_series(1, $1::int) g")
            async for r in cstmt.cursor(2500, prefetch=300):
                cursor_rows.append(tuple(r))
        server_side = await conn.fetchval("select count(*) from pg_prepared_statements where name like '__asyncpg%'")
        return results, vals, cursor_rows[-1], len(cursor_rows), attrs(stmt), [p.name for p in stmt.get_parameters()], server_side > 0

    results, vals, last, n, desc, params, has_server_side = assert_same(run_async(on_both(apg_params, run)))
    assert results[199] == (199 * 200, "199") and vals == [12] * 20
    assert (last, n) == ((2500, "2500"), 2500)
    assert params == ["int8", "int8", "text"]
    assert has_server_side


def test_statement_cache_invalidation(apg_params):
    """asyncpg re-prepares when a cached statement's result type changes."""

    async def run(conn):
        await conn.execute("create temp table t (id int, v int)")
        await conn.execute("insert into t values (1, 10)")
        a = [await conn.fetchrow("select * from t") for _ in range(3)]
        await conn.execute("alter table t alter column v type text")
        b = await conn.fetchrow("select * from t")
        return plain(a), tuple(b)

    a, b = assert_same(run_async(on_both(apg_params, run)))
    assert a == [(1, 10)] * 3 and b == (1, "10")


def test_transactions(apg_params):
    async def run(conn):
        await conn.execute("create temp table t (id int primary key)")
        async with conn.transaction():
            await conn.execute("insert into t values (1)")
        try:
            async with conn.transaction():
                await conn.execute("insert into t values (2)")
                raise RuntimeError("abort")
        except RuntimeError:
            pass
        async with conn.transaction():
            await conn.execute("insert into t values (3)")
            try:
                async with conn.transaction():  # savepoint
                    await conn.execute("insert into t values (4)")
                    await conn.execute("insert into t values (3)")
            except asyncpg.UniqueViolationError:
                pass
            in_tx = conn.is_in_transaction()
        tx = conn.transaction(isolation="serializable", readonly=True)
        await tx.start()
        iso = await conn.fetchval("show transaction_isolation")
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError) as ei:
            await conn.execute("create table sy_pytest_readonly_probe (x int)")
        await tx.rollback()
        return await conn.fetchval("select array_agg(id order by id) from t"), in_tx, iso, ei.value.sqlstate, conn.is_in_transaction()

    ids, in_tx, iso, state, after = assert_same(run_async(on_both(apg_params, run)))
    assert ids == [1, 3] and in_tx and iso == "serializable" and state == "25006" and not after


def test_copy_records_to_table_and_copy_from_query(apg_params):
    records = [(i, f"name {i}\t\\ ü", decimal.Decimal(i) / 8, None if i % 3 else [i, i], dt.date(2000, 1, 1) + dt.timedelta(days=i)) for i in range(3000)]

    async def run(conn):
        await conn.execute("create temp table t (id int primary key, name text, n numeric, a int[], d date)")
        status = await conn.copy_records_to_table("t", records=records, columns=["id", "name", "n", "a", "d"])
        # async iterable source too
        async def more():
            for i in range(3000, 3100):
                yield (i, "more", None, None, None)

        status2 = await conn.copy_records_to_table("t", records=more())
        rows = plain(await conn.fetch("select * from t order by id"))
        buf = io.BytesIO()
        s3 = await conn.copy_from_query("select id, name, d from t where id < $1 order by id", 200, output=buf, format="csv", header=True)
        chunks = []

        async def sink(data):
            chunks.append(bytes(data))

        s4 = await conn.copy_from_table("t", output=sink, columns=["id", "n"], format="binary")
        binary = b"".join(chunks)
        # copy_to_table with a file-like source
        await conn.execute("create temp table t2 (id int, name text, d date)")
        buf.seek(0)
        s5 = await conn.copy_to_table("t2", source=buf, format="csv", header=True)
        t2 = await conn.fetchval("select count(*) from t2")
        return status, status2, rows, s3, buf.getvalue(), s4, binary, s5, t2

    status, status2, rows, s3, csv, s4, binary, s5, t2 = assert_same(run_async(on_both(apg_params, run)))
    assert status == "COPY 3000" and status2 == "COPY 100"
    assert rows[:3000] == [tuple(r) for r in records]
    assert s3 == "COPY 200" and csv.startswith(b"id,name,d\n0,")
    assert s4 == "COPY 3100" and binary.startswith(b"PGCOPY\n\xff\r\n\x00")
    assert s5 == "COPY 200" and t2 == 200


def test_copy_errors(apg_params):
    async def run(conn):
        await conn.execute("create temp table t (id int primary key, v text not null)")
        with pytest.raises(asyncpg.NotNullViolationError) as e1:
            await conn.copy_records_to_table("t", records=[(1, "a"), (2, None)])
        with pytest.raises(asyncpg.UniqueViolationError) as e2:
            await conn.copy_records_to_table("t", records=[(1, "a"), (1, "b")])
        await conn.copy_records_to_table("t", records=[(7, "ok")])
        return (e1.value.sqlstate, e1.value.message), (e2.value.sqlstate, e2.value.message, e2.value.detail), await conn.fetchval("select count(*) from t")

    e1, e2, n = assert_same(run_async(on_both(apg_params, run)))
    assert e1[0] == "23502" and e2[0] == "23505" and n == 1


ERRORS = [
    ("select 1 / $1::int", (0,), asyncpg.DivisionByZeroError, "22012"),
    ("insert into t values ($1)", (1,), asyncpg.UniqueViolationError, "23505"),
    ("selec $1", (1,), asyncpg.PostgresSyntaxError, "42601"),
    ("select * from sy_no_such_table where x = $1", (1,), asyncpg.UndefinedTableError, "42P01"),
    ("select $1::int", ("x",), None, None),  # client-side encode error, no server round trip
    ("select 'zz'::int + $1", (1,), asyncpg.InvalidTextRepresentationError, "22P02"),
    ("select 1", (), None, None),
]


def test_errors_match(apg_params):
    async def run(conn):
        await conn.execute("create temp table t (id int primary key)")
        await conn.execute("insert into t values (1)")
        out = []
        for q, args, exc, _ in ERRORS:
            try:
                res = await conn.fetch(q, *args)
                out.append(("ok", plain(res)))
            except asyncpg.PostgresError as e:
                out.append(
                    (type(e).__name__, e.sqlstate, e.message, e.detail, e.hint, e.position, e.severity, e.constraint_name)
                )
            except Exception as e:  # client-side errors (encoding)
                out.append(("client", type(e).__name__))
        # still usable
        out.append(await conn.fetchval("select count(*) from t"))
        return out

    out = assert_same(run_async(on_both(apg_params, run)))
    for (q, args, exc, state), got in zip(ERRORS, out):
        if exc is not None:
            assert got[0] == exc.__name__ and got[1] == state, (q, got)
    assert out[-1] == 1


def test_server_info_and_settings(apg_params):
    async def run(conn):
        v = conn.get_server_version()
        pid_ok = conn.get_server_pid() == await conn.fetchval("select pg_backend_pid()")
        s = conn.get_settings()
        return (
            tuple(v),
            pid_ok,
            s.server_version,
            s.server_encoding,
            s.client_encoding,
            s.DateStyle,
            s.TimeZone,
            s.application_name,
            s.integer_datetimes,
            s.standard_conforming_strings,
        )

    res = assert_same(run_async(on_both(apg_params, run, application_name="sy-apg", TimeZone="Europe/Paris")))
    assert res[1] is True and res[6] == "Europe/Paris" and res[7] == "sy-apg"


def test_timeout_cancels_query(apg_params):
    async def run(conn):
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetch("select pg_sleep(5)", timeout=0.3)
        elapsed = time.monotonic() - t0
        # asyncpg sent a CancelRequest; the connection must be usable again quickly
        val = await conn.fetchval("select 'alive'")
        elapsed_total = time.monotonic() - t0
        active = await conn.fetchval(
            "select count(*) from pg_stat_activity where query = 'select pg_sleep(5)' and pid = pg_backend_pid()"
        )
        return elapsed < 2.0, val, elapsed_total < 3.0, active

    assert assert_same(run_async(on_both(apg_params, run))) == (True, "alive", True, 0)


def test_listen_notify(apg_params, uniq):
    async def run():
        listener = await asyncpg.connect(**apg_params("proxy"))
        sender = await asyncpg.connect(**apg_params("proxy"))
        try:
            got: asyncio.Queue = asyncio.Queue()
            await listener.add_listener(uniq, lambda c, pid, ch, payload: got.put_nowait((pid, ch, payload)))
            await sender.execute("select pg_notify($1, $2)", uniq, "hi")
            note = await asyncio.wait_for(got.get(), 5)
            return note, sender.get_server_pid(), await sender.fetchval("select pg_backend_pid()")
        finally:
            await listener.close()
            await sender.close()

    (pid, ch, payload), reported, real = run_async(run())
    assert (ch, payload) == (uniq, "hi")
    assert pid == reported == real


def test_pool_concurrent_queries(apg_params, uniq, cleanup):
    table = f"{uniq}_pool"
    cleanup(f"drop table if exists {table}")
    total = 500

    async def run():
        async with asyncpg.create_pool(min_size=8, max_size=8, **apg_params("proxy")) as pool:
            await pool.execute(f"create table {table} (id int primary key, pid int)")
            pids = set()

            async def one(i):
                async with pool.acquire() as conn:
                    kind = i % 5
                    if kind == 0:
                        async with conn.transaction():
                            await conn.execute(f"insert into {table} values ($1, pg_backend_pid())", i)
                            return ("tx", await conn.fetchval(f"select pid from {table} where id = $1", i) == conn.get_server_pid())
                    if kind == 1:
                        return ("sum", await conn.fetchval("select sum(g) from generate_series(1, $1::int) g", i))
                    if kind == 2:
                        try:
                            await conn.fetchval("select 1 / ($1::int - $1::int)", i)
                        except asyncpg.DivisionByZeroError as e:
                            return ("err", e.sqlstate)
                    if kind == 3:
                        pids.add(await conn.fetchval("select pg_backend_pid()"))
                        return ("pid", True)
                    rows = await conn.fetch("select $1::text || g from generate_series(1, 20) g", str(i))
                    return ("rows", len(rows))

            t0 = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(total)))
            elapsed = time.monotonic() - t0
            inserted = await pool.fetchval(f"select count(*) from {table}")
            distinct_pids = await pool.fetchval(f"select count(distinct pid) from {table}")
            return results, elapsed, inserted, distinct_pids, len(pids)

    results, elapsed, inserted, distinct_pids, n_pids = run_async(run(), timeout=45)
    for i, res in enumerate(results):
        kind = i % 5
        expected = {
            0: ("tx", True),
            1: ("sum", i * (i + 1) // 2),
            2: ("err", "22012"),
            3: ("pid", True),
            4: ("rows", 20),
        }[kind]
        assert res == expected, (i, res)
    assert inserted == total // 5
    assert 1 <= distinct_pids <= 8 and 1 <= n_pids <= 8
    assert elapsed < 30
