"""psycopg 3 through the proxy must behave exactly like psycopg 3 against PostgreSQL.

Scenarios are run on both targets; where the outcome is data it is compared
direct vs proxy, where it is behaviour (cancel, terminate) the test is
parametrized over both targets so a failure on 'proxy' alone points at the proxy.
"""

from __future__ import annotations

import datetime as dt
import decimal
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.pq import Format, TransactionStatus

from sy_helpers import TARGETS, diag_summary


def on_both(connect, fn, **conn_kwargs):
    """Run fn(conn) on a fresh connection per target; return {target: result}."""
    out = {}
    for target in TARGETS:
        conn = connect(target, **conn_kwargs)
        out[target] = fn(conn)
    return out


def assert_same(results: dict):
    assert results["proxy"] == results["direct"]
    return results["direct"]


def describe(cur) -> list[tuple]:
    return [(c.name, c.type_code, c.internal_size, c.precision, c.scale) for c in cur.description]


# --------------------------------------------------------------------------
# simple query protocol


def test_simple_query_single(connect):
    def run(conn):
        cur = conn.execute("select 1 as a, 'x'::text as b, null::int as c, 2.5::numeric as d")
        return describe(cur), cur.fetchall(), cur.statusmessage, cur.pgresult.fformat(0)

    desc, rows, status, fmt = assert_same(on_both(connect, run, autocommit=True))
    assert rows == [(1, "x", None, decimal.Decimal("2.5"))]
    assert status == "SELECT 1"
    assert fmt == Format.TEXT


def test_simple_query_multi_statement(connect):
    def run(conn):
        cur = conn.cursor()
        cur.execute(
            "create temp table t (id int primary key, v text);"
            "insert into t values (1, 'a'), (2, 'b');"
            "select * from t order by id;"
            "update t set v = 'z' where id = 2;"
            "select count(*) from t"
        )
        sets = []
        while True:
            sets.append((cur.statusmessage, cur.fetchall() if cur.description else None))
            if not cur.nextset():
                break
        return sets

    sets = assert_same(on_both(connect, run, autocommit=True))
    assert sets[-1] == ("SELECT 1", [(2,)])
    assert ("SELECT 2", [(1, "a"), (2, "b")]) in sets


def test_client_side_binding_cursor(connect):
    """ClientCursor inlines parameters and uses the simple query protocol."""

    def run(conn):
        cur = psycopg.ClientCursor(conn)
        cur.execute("select %s::int, %s::text, %s::date, %s", (42, "it's", dt.date(2024, 2, 29), None))
        return cur.fetchall()

    assert assert_same(on_both(connect, run, autocommit=True)) == [(42, "it's", dt.date(2024, 2, 29), None)]


def test_empty_query_and_large_result(connect):
    def run(conn):
        cur = conn.execute("select g, repeat('x', g % 100) from generate_series(1, 20000) g")
        rows = cur.fetchall()
        cur.execute("-- nothing but a comment")
        return len(rows), rows[-1], cur.pgresult.status

    n, last, status = assert_same(on_both(connect, run, autocommit=True))
    assert n == 20000 and last == (20000, "")
    assert status == psycopg.pq.ExecStatus.EMPTY_QUERY


# --------------------------------------------------------------------------
# extended protocol: parameters, prepared statements, binary


def test_server_side_parameters(connect):
    params = (
        7,
        2**40,
        decimal.Decimal("12345678901234567890.000123"),
        1.5,
        "héllo wörld",
        b"\x00\x01\xff",
        True,
        dt.date(1999, 12, 31),
        dt.datetime(2024, 1, 2, 3, 4, 5, 678000),
        dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        dt.timedelta(days=1, seconds=3661),
        uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        [1, 2, 3],
        None,
    )
    q = "select " + ", ".join(["%s"] * len(params))

    def run(conn):
        cur = conn.execute(q, params)
        return describe(cur), cur.fetchall()

    desc, rows = assert_same(on_both(connect, run, autocommit=True))
    got = rows[0]
    assert got[:12] == params[:12]
    assert got[12] == [1, 2, 3] and got[13] is None


def test_named_parameters_and_executemany(connect):
    def run(conn):
        conn.execute("create temp table t (id int primary key, v text, n numeric)")
        cur = conn.cursor()
        cur.executemany(
            "insert into t (id, v, n) values (%(id)s, %(v)s, %(n)s)",
            [{"id": i, "v": f"v{i}", "n": decimal.Decimal(i) / 7} for i in range(300)],
        )
        cur.executemany("insert into t (id, v) values (%s, %s) returning id * 10", [(1000, "a"), (1001, "b")], returning=True)
        ret = []
        while True:
            ret.extend(cur.fetchall())
            if not cur.nextset():
                break
        cur.execute("select count(*), sum(id), min(v), max(n) from t")
        return ret, cur.fetchone()

    ret, agg = assert_same(on_both(connect, run, autocommit=True))
    assert ret == [(10000,), (10010,)]
    assert agg[0] == 302


def test_prepared_statements_reused(connect):
    def run(conn):
        out = []
        for i in range(60):
            cur = conn.execute("select %s::int * 2, %s::text || '!'", (i, str(i)), prepare=True)
            out.append(cur.fetchone())
        # the statement really is prepared on the server session behind the proxy
        names = conn.execute(
            "select name, statement from pg_prepared_statements where statement like 'select $1::int * 2%%'"
        ).fetchall()
        return out, len(names)

    out, n_prepared = assert_same(on_both(connect, run, autocommit=True))
    assert out == [(i * 2, f"{i}!") for i in range(60)]
    assert n_prepared == 1


def test_automatic_prepare_threshold_and_deallocate(connect):
    def run(conn):
        conn.prepare_threshold = 2
        res = [conn.execute("select %s::int + 1", (i,)).fetchone()[0] for i in range(10)]
        before = conn.execute("select count(*) from pg_prepared_statements").fetchone()[0]
        conn.execute("deallocate all")
        # psycopg must notice and re-prepare transparently
        res += [conn.execute("select %s::int + 1", (i,)).fetchone()[0] for i in range(10)]
        return res, before >= 1

    res, had = assert_same(on_both(connect, run, autocommit=True))
    assert res == [i + 1 for i in range(10)] * 2 and had


def test_binary_results(connect):
    q = (
        "select 1::int2 a, 2::int4 b, 3::int8 c, 1.25::float4 d, 2.5::float8 e, "
        "123.456::numeric f, 'txt'::text g, '\\xdeadbeef'::bytea h, true i, "
        "'2024-02-29'::date j, '2024-02-29 01:02:03.456789'::timestamp k, "
        "'2024-02-29 01:02:03+05'::timestamptz l, '1 mon 2 days 03:04:05'::interval m, "
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid n, '{\"k\": [1, 2]}'::jsonb o, "
        "array[1, null, 3]::int[] p, array['a', 'b']::text[] q, null::int r"
    )

    def run(conn):
        cur = conn.cursor(binary=True)
        cur.execute(q)
        fmts = {cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)}
        rows1 = cur.fetchall()
        cur2 = conn.execute(q, binary=True)
        rows2 = cur2.fetchall()
        cur3 = conn.cursor(binary=True)
        cur3.execute("select %s::int8, %s::bytea", (5, b"\x00\x01"), prepare=True)
        cur3.execute("select %s::int8, %s::bytea", (6, b"\x02"), prepare=True)
        return describe(cur), rows1, rows2, cur3.fetchall(), fmts

    desc, rows1, rows2, rows3, fmts = assert_same(on_both(connect, run, autocommit=True))
    assert fmts == {Format.BINARY}
    assert rows1 == rows2
    assert rows1[0][7] == b"\xde\xad\xbe\xef"
    assert rows1[0][15] == [1, None, 3]
    assert rows3 == [(6, b"\x02")]


def test_binary_large_result_with_server_cursor(connect):
    def run(conn):
        with conn.transaction():
            with conn.cursor(name="big", binary=True) as cur:
                cur.itersize = 1000
                cur.execute("select g, md5(g::text) from generate_series(1, 10000) g")
                total = 0
                last = None
                for row in cur:
                    total += row[0]
                    last = row
        return total, last

    total, last = assert_same(on_both(connect, run))
    assert total == sum(range(1, 10001))


# --------------------------------------------------------------------------
# transactions


def test_transactions_commit_and_rollback(connect, uniq, cleanup):
    table = f"{uniq}_tx"
    ident = sql.Identifier(table)
    cleanup(f"drop table if exists {table}")
    setup = connect("direct", autocommit=True)
    setup.execute(sql.SQL("create table {} (id int primary key, who text)").format(ident))

    def run(conn):
        states = []
        conn.execute(sql.SQL("insert into {} values (%s, %s)").format(ident), (conn.info.backend_pid, "a"))
        states.append(conn.info.transaction_status)
        conn.rollback()
        states.append(conn.info.transaction_status)
        conn.execute(sql.SQL("insert into {} values (%s, %s)").format(ident), (conn.info.backend_pid, "b"))
        conn.commit()
        with conn.transaction():
            conn.execute(sql.SQL("update {} set who = 'c' where id = %s").format(ident), (conn.info.backend_pid,))
            try:
                with conn.transaction():  # savepoint
                    conn.execute(sql.SQL("update {} set who = 'd' where id = %s").format(ident), (conn.info.backend_pid,))
                    conn.execute("select 1/0")
            except errors.DivisionByZero:
                pass
            states.append(conn.info.transaction_status)
        states.append(conn.info.transaction_status)
        row = conn.execute(sql.SQL("select who from {} where id = %s").format(ident), (conn.info.backend_pid,)).fetchone()
        conn.rollback()
        return states, row

    states, row = assert_same(on_both(connect, run))
    assert states == [TransactionStatus.INTRANS, TransactionStatus.IDLE, TransactionStatus.INTRANS, TransactionStatus.IDLE]
    assert row == ("c",)
    seen = setup.execute(sql.SQL("select who from {}").format(ident)).fetchall()
    assert sorted(seen) == [("c",), ("c",)]


def test_failed_transaction_state(connect):
    def run(conn):
        conn.execute("select 1")
        with pytest.raises(errors.DivisionByZero):
            conn.execute("select 1/0")
        st1 = conn.info.transaction_status
        with pytest.raises(errors.InFailedSqlTransaction) as ei:
            conn.execute("select 2")
        conn.rollback()
        return st1, diag_summary(ei.value.diag), conn.execute("select 3").fetchone()

    st1, diag, row = assert_same(on_both(connect, run))
    assert st1 == TransactionStatus.INERROR and diag["sqlstate"] == "25P02" and row == (3,)


# --------------------------------------------------------------------------
# errors


ERROR_CASES = [
    ("unique_violation", "23505", "insert into t values (1, 'dup')", errors.UniqueViolation),
    ("division_by_zero", "22012", "select 1 / (%s - 1)", errors.DivisionByZero),
    ("syntax_error", "42601", "selec 1 frm t", errors.SyntaxError),
    ("undefined_table", "42P01", "select * from no_such_table_sy", errors.UndefinedTable),
    ("undefined_column", "42703", "select no_such_col from t", errors.UndefinedColumn),
    ("not_null", "23502", "insert into t (id, v) values (null, 'x')", errors.NotNullViolation),
    ("check", "23514", "insert into t values (-5, 'neg')", errors.CheckViolation),
    ("invalid_text", "22P02", "select 'abc'::int", errors.InvalidTextRepresentation),
    ("raise_custom", "P0001", "do $$ begin raise exception 'custom %', 42 using detail = 'dd', hint = 'hh'; end $$", errors.RaiseException),
]


@pytest.mark.parametrize("name,sqlstate,query,exc", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
@pytest.mark.parametrize("prepare", [False, True], ids=["unprepared", "prepared"])
def test_errors_match(connect, name, sqlstate, query, exc, prepare):
    def run(conn):
        conn.execute("create temp table t (id int primary key check (id >= 0), v text)")
        conn.execute("insert into t values (1, 'one')")
        params = (1,) if "%s" in query else None
        with pytest.raises(exc) as ei:
            if params is None and not prepare:
                conn.execute(query)  # simple query protocol
            else:
                conn.execute(query, params, prepare=prepare)
        # the session keeps working after the error
        after = conn.execute("select count(*) from t").fetchone()
        return type(ei.value).__name__, ei.value.sqlstate, diag_summary(ei.value.diag), str(ei.value), after

    cls, state, diag, text, after = assert_same(on_both(connect, run, autocommit=True))
    assert state == sqlstate == diag["sqlstate"]
    assert diag["severity"] == "ERROR"
    assert after == (1,)


def test_error_fields_full(connect):
    def run(conn):
        conn.execute("create temp table t (id int primary key, v text)")
        conn.execute("insert into t values (1, 'a')")
        with pytest.raises(errors.UniqueViolation) as ei:
            conn.execute("insert into t values (%s, %s)", (1, "b"))
        d = ei.value.diag
        return diag_summary(d), d.table_name, d.source_function

    diag, table, func = assert_same(on_both(connect, run, autocommit=True))
    assert diag["message_primary"] == 'duplicate key value violates unique constraint "t_pkey"'
    assert diag["message_detail"] == "Key (id)=(1) already exists."
    assert table == "t" and diag["constraint_name"] == "t_pkey"


# --------------------------------------------------------------------------
# notices


def test_notices(connect):
    def run(conn):
        got = []
        conn.add_notice_handler(lambda d: got.append(diag_summary(d)))
        conn.execute(
            "do $$ begin raise notice 'hello % from %', 1, 'plpgsql'; "
            "raise warning 'careful' using detail = 'det', hint = 'hint'; "
            "raise info 'info msg'; end $$"
        )
        conn.execute("drop table if exists sy_surely_missing_table")  # server NOTICE
        conn.execute("set client_min_messages = warning")
        conn.execute("do $$ begin raise notice 'filtered'; raise warning 'kept'; end $$")
        return got

    got = assert_same(on_both(connect, run, autocommit=True))
    prim = [(g["severity"], g["message_primary"]) for g in got]
    assert prim == [
        ("NOTICE", "hello 1 from plpgsql"),
        ("WARNING", "careful"),
        ("INFO", "info msg"),
        ("NOTICE", 'table "sy_surely_missing_table" does not exist, skipping'),
        ("WARNING", "kept"),
    ]
    assert got[1]["message_detail"] == "det" and got[1]["message_hint"] == "hint"


# --------------------------------------------------------------------------
# LISTEN / NOTIFY


def _wait_notify(conn, timeout=5.0):
    gen = conn.notifies(timeout=timeout, stop_after=1)
    got = list(gen)
    assert got, "no notification received within timeout"
    return got[0]


def test_listen_notify_two_proxy_connections(connect, uniq):
    listener = connect("proxy", autocommit=True)
    sender = connect("proxy", autocommit=True)
    chan = uniq
    listener.execute(sql.SQL("listen {}").format(sql.Identifier(chan)))
    sender_pid = sender.execute("select pg_backend_pid()").fetchone()[0]
    assert sender.info.backend_pid == sender_pid
    assert listener.info.backend_pid == listener.execute("select pg_backend_pid()").fetchone()[0]
    sender.execute("select pg_notify(%s, %s)", (chan, "payload ü 1"))
    n = _wait_notify(listener)
    assert (n.channel, n.payload, n.pid) == (chan, "payload ü 1", sender_pid)
    # NOTIFY inside a transaction is delivered at commit
    with sender.transaction():
        sender.execute(sql.SQL("notify {}, 'in tx'").format(sql.Identifier(chan)))
    n = _wait_notify(listener)
    assert (n.payload, n.pid) == ("in tx", sender.info.backend_pid)
    # a notification arriving while the listener is idle is delivered with the next query
    sender.execute("select pg_notify(%s, 'idle')", (chan,))
    time.sleep(0.2)
    got = []
    listener.add_notify_handler(got.append)
    listener.execute("select 1")
    if not got:
        got.append(_wait_notify(listener))
    assert [(x.payload, x.pid) for x in got] == [("idle", sender_pid)]


def test_listen_notify_cross_direct_and_proxy(connect, uniq):
    d = connect("direct", autocommit=True)
    p = connect("proxy", autocommit=True)
    d.execute(sql.SQL("listen {}").format(sql.Identifier(uniq)))
    p.execute(sql.SQL("listen {}").format(sql.Identifier(uniq)))
    p.execute("select pg_notify(%s, 'from proxy')", (uniq,))
    n = _wait_notify(d)
    assert (n.payload, n.pid) == ("from proxy", p.info.backend_pid)
    n = _wait_notify(p)  # self-notification
    assert (n.payload, n.pid) == ("from proxy", p.info.backend_pid)
    d.execute("select pg_notify(%s, 'from direct')", (uniq,))
    n = _wait_notify(p)
    assert (n.payload, n.pid) == ("from direct", d.info.backend_pid)


# --------------------------------------------------------------------------
# COPY


def test_copy_text_roundtrip(connect):
    rows_in = [(i, f"row {i}\twith tab\\ and ü", None if i % 7 == 0 else dt.date(2020, 1, 1) + dt.timedelta(days=i)) for i in range(2000)]

    def run(conn):
        conn.execute("create temp table t (id int primary key, v text, d date)")
        with conn.cursor().copy("copy t (id, v, d) from stdin") as cp:
            for r in rows_in:
                cp.write_row(r)
        out = []
        with conn.cursor().copy("copy (select id, v, d from t order by id) to stdout") as cp:
            cp.set_types(["int4", "text", "date"])
            for row in cp.rows():
                out.append(row)
        raw = b""
        with conn.cursor().copy("copy (select id, v from t where id < 50 order by id) to stdout with (format csv, header)") as cp:
            for chunk in cp:
                raw += bytes(chunk)
        return out, raw, conn.execute("select count(*) from t").fetchone()

    out, raw, count = assert_same(on_both(connect, run, autocommit=True))
    assert out == rows_in and count == (2000,)
    assert raw.startswith(b"id,v\n0,")


def test_copy_binary_roundtrip(connect):
    rows_in = [(i, b"\x00\xff" * (i % 5), decimal.Decimal(i) / 3, [i, i + 1]) for i in range(1000)]

    def run(conn):
        conn.execute("create temp table t (id int8, b bytea, n numeric, a int4[])")
        with conn.cursor().copy("copy t from stdin (format binary)") as cp:
            cp.set_types(["int8", "bytea", "numeric", "int4[]"])
            for r in rows_in:
                cp.write_row(r)
        out = []
        with conn.cursor().copy("copy (select * from t order by id) to stdout (format binary)") as cp:
            cp.set_types(["int8", "bytea", "numeric", "int4[]"])
            out = list(cp.rows())
        return out

    out = assert_same(on_both(connect, run, autocommit=True))
    assert [(r[0], r[1], r[3]) for r in out] == [(r[0], r[1], r[3]) for r in rows_in]


def test_copy_errors_and_recovery(connect):
    def run(conn):
        conn.execute("create temp table t (id int primary key)")
        with pytest.raises(errors.InvalidTextRepresentation) as e1:
            with conn.cursor().copy("copy t from stdin") as cp:
                cp.write(b"1\n2\nnot-a-number\n3\n")
        d1 = diag_summary(e1.value.diag)
        with pytest.raises(errors.UniqueViolation) as e2:
            with conn.cursor().copy("copy t from stdin") as cp:
                cp.write(b"5\n5\n")
        d2 = diag_summary(e2.value.diag)
        # client-side abort: psycopg sends CopyFail
        with pytest.raises(errors.QueryCanceled) as e3:
            with conn.cursor().copy("copy t from stdin") as cp:
                cp.write(b"7\n")
                raise errors.QueryCanceled("client gave up")
        d3 = e3.value.sqlstate
        with conn.cursor().copy("copy t from stdin") as cp:
            cp.write(b"10\n11\n")
        return d1, d2, d3, conn.execute("select array_agg(id order by id) from t").fetchone()

    d1, d2, d3, final = assert_same(on_both(connect, run, autocommit=True))
    assert d1["sqlstate"] == "22P02" and d2["sqlstate"] == "23505"
    assert final == ([10, 11],)


# --------------------------------------------------------------------------
# pipeline mode


def test_pipeline_many_statements(connect):
    def run(conn):
        conn.execute("create temp table t (id int primary key, v text)")
        curs = []
        with conn.pipeline():
            for i in range(500):
                conn.execute("insert into t values (%s, %s)", (i, f"v{i}"))
                if i % 50 == 0:
                    curs.append(conn.execute("select count(*), max(id) from t"))
            curs.append(conn.execute("select sum(id) from t", prepare=True))
        results = [c.fetchall() for c in curs]
        with conn.pipeline():
            prepared = [conn.execute("select %s::int * 3", (i,), prepare=True) for i in range(100)]
        return results, [c.fetchone()[0] for c in prepared], conn.info.transaction_status

    results, prepared, st = assert_same(on_both(connect, run, autocommit=True))
    assert results[0] == [(1, 0)] and results[-1] == [(sum(range(500)),)]
    assert prepared == [i * 3 for i in range(100)]


def test_pipeline_error_in_the_middle_and_recovery(connect):
    def run(conn):
        conn.execute("create temp table t (id int primary key)")
        events = []
        with conn.pipeline() as p:
            conn.execute("insert into t values (1)")
            conn.execute("insert into t values (2)")
            p.sync()
            conn.execute("insert into t values (3)")
            conn.execute("insert into t values (1)")  # duplicate -> error
            # The server skips everything up to the Sync. psycopg raises the error at the
            # first call that reads it: the next execute if the answer is already in, else
            # the sync (timing decides, directly as through the proxy).
            # Give the error time to arrive, so both sides take the same path.
            time.sleep(0.2)
            with pytest.raises(errors.UniqueViolation) as ei:
                conn.execute("insert into t values (4)")
                p.sync()
            events.append(("error", diag_summary(ei.value.diag)))
            # The skipped statement's result is reported at the next sync (PipelineAborted);
            # the sync after that finds the pipeline usable again.
            with pytest.raises(psycopg.errors.PipelineAborted):
                p.sync()
            p.sync()
            # the pipeline is usable again after the failed sync
            conn.execute("insert into t values (5)")
            c = conn.execute("select array_agg(id order by id) from t")
        events.append(("final", c.fetchone()))
        # an error raised when the pipeline block exits
        with pytest.raises(errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("insert into t values (6)")
                conn.execute("select 1/0")
                conn.execute("insert into t values (7)")
        events.append(("after", conn.execute("select array_agg(id order by id) from t").fetchone()))
        return events

    events = assert_same(on_both(connect, run, autocommit=True))
    assert events[0][1]["sqlstate"] == "23505"
    assert events[1] == ("final", ([1, 2, 5],)), "3 and 4 were rolled back with the failed batch"
    assert events[2] == ("after", ([1, 2, 5],))


def test_pipeline_in_transaction(connect):
    def run(conn):
        conn.execute("create temp table t (id int primary key) on commit preserve rows")
        conn.commit()
        with conn.pipeline():
            for i in range(100):
                conn.execute("insert into t values (%s)", (i,))
            c = conn.execute("select count(*) from t")
        n1 = c.fetchone()
        conn.rollback()
        n2 = conn.execute("select count(*) from t").fetchone()
        conn.rollback()
        return n1, n2

    assert assert_same(on_both(connect, run)) == ((100,), (0,))


# --------------------------------------------------------------------------
# ParameterStatus


REPORTED = [
    "server_version",
    "server_encoding",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "integer_datetimes",
    "standard_conforming_strings",
    "is_superuser",
    "session_authorization",
    "application_name",
]


def test_parameter_status_matches(connect):
    def run(conn):
        info = conn.info
        start = {k: info.parameter_status(k) for k in REPORTED}
        conn.execute("set timezone = 'America/New_York'")
        conn.execute("set application_name = 'changed-later'")
        conn.execute("set datestyle = 'SQL, DMY'")
        later = {k: info.parameter_status(k) for k in ("TimeZone", "application_name", "DateStyle")}
        return start, later, info.server_version, info.encoding

    start, later, version, enc = assert_same(
        on_both(connect, run, autocommit=True, dsn_extra={"application_name": "sy-pytest-app"})
    )
    assert start["application_name"] == "sy-pytest-app"
    assert start["server_version"] and start["TimeZone"]
    assert later == {"TimeZone": "America/New_York", "application_name": "changed-later", "DateStyle": "SQL, DMY"}


def test_startup_options_are_forwarded(connect):
    def run(conn):
        return conn.execute(
            "select current_setting('timezone'), current_setting('search_path'), "
            "current_setting('statement_timeout'), current_setting('application_name')"
        ).fetchone(), conn.info.parameter_status("TimeZone")

    row, tz = assert_same(
        on_both(
            connect,
            run,
            autocommit=True,
            dsn_extra={"options": "-c TimeZone=Asia/Tokyo -c search_path=pg_catalog,public -c statement_timeout=12345", "application_name": "opts"},
        )
    )
    assert row == ("Asia/Tokyo", "pg_catalog,public", "12345ms", "opts") and tz == "Asia/Tokyo"


def test_backend_pid_is_the_real_one(connect):
    def run(conn):
        return conn.info.backend_pid == conn.execute("select pg_backend_pid()").fetchone()[0]

    assert assert_same(on_both(connect, run, autocommit=True)) is True


# --------------------------------------------------------------------------
# cancel and termination


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("how", ["cancel", "cancel_safe"])
def test_cancel_running_query(connect, target, how):
    conn = connect(target, autocommit=True)
    if how == "cancel_safe" and not hasattr(conn, "cancel_safe"):
        how = "cancel"  # psycopg < 3.2
    errs = []

    def fire():
        try:
            getattr(conn, how)()
        except Exception as exc:  # pragma: no cover - reported below
            errs.append(exc)

    timer = threading.Timer(0.3, fire)
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(errors.QueryCanceled) as ei:
            conn.execute("select pg_sleep(5)")
    finally:
        timer.cancel()
        timer.join()
    elapsed = time.monotonic() - start
    assert not errs, f"{how}() raised {errs[0]!r}"
    assert ei.value.sqlstate == "57014"
    assert ei.value.diag.message_primary == "canceling statement due to user request"
    assert elapsed < 2.0, f"cancel took {elapsed:.2f}s"
    # the session survives a cancel and stays in sync
    assert conn.execute("select 41 + 1").fetchone() == (42,)


@pytest.mark.parametrize("target", TARGETS)
def test_cancel_in_transaction_then_rollback(connect, target):
    conn = connect(target)
    conn.execute("select 1")
    timer = threading.Timer(0.3, conn.cancel)
    timer.start()
    with pytest.raises(errors.QueryCanceled):
        conn.execute("select pg_sleep(5)")
    timer.join()
    assert conn.info.transaction_status == TransactionStatus.INERROR
    conn.rollback()
    assert conn.execute("select 'ok'").fetchone() == ("ok",)


@pytest.mark.parametrize("target", TARGETS)
def test_terminate_backend(connect, target):
    victim = connect(target, autocommit=True)
    pid = victim.execute("select pg_backend_pid()").fetchone()[0]
    assert pid == victim.info.backend_pid
    killer = connect("direct", autocommit=True)
    assert killer.execute("select pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (True,)
    deadline = time.monotonic() + 5
    while killer.execute("select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone():
        assert time.monotonic() < deadline, "backend did not exit"
        time.sleep(0.05)
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as ei:
        victim.execute("select 1")
    assert time.monotonic() - t0 < 3
    # PostgreSQL sends FATAL 57P01 before closing; the proxy must relay it
    assert isinstance(ei.value, errors.AdminShutdown), repr(ei.value)
    assert ei.value.sqlstate == "57P01"
    assert ei.value.diag.message_primary == "terminating connection due to administrator command"
    assert victim.closed or victim.broken


@pytest.mark.parametrize("target", TARGETS)
def test_terminate_backend_during_query(connect, target):
    victim = connect(target, autocommit=True)
    pid = victim.info.backend_pid
    killer = connect("direct", autocommit=True)

    def kill():
        killer.execute("select pg_terminate_backend(%s)", (pid,))

    timer = threading.Timer(0.3, kill)
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(errors.AdminShutdown) as ei:
            victim.execute("select pg_sleep(5)")
    finally:
        timer.join()
    assert time.monotonic() - t0 < 2.5
    assert ei.value.sqlstate == "57P01"
    assert victim.closed or victim.broken
