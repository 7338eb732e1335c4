"""Less common protocol situations a transparent proxy must relay unchanged:
startup errors, asynchronous FATALs from the server, large messages, many
parameters, server-side timeouts, and connection churn."""

from __future__ import annotations

import threading
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors

from sy_helpers import TARGETS, diag_summary, run_async


def test_startup_error_is_relayed(dsns):
    """An invalid startup option makes PostgreSQL refuse the login with FATAL."""
    from psycopg.conninfo import make_conninfo

    out = {}
    for target in TARGETS:
        dsn = make_conninfo(dsns[target], options="-c sy_no_such_setting_x=1 -c statement_timeout=abc")
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as ei:
            psycopg.connect(dsn)
        out[target] = (type(ei.value).__name__, time.monotonic() - t0 < 5)
        msg = str(ei.value)
        # libpq prefixes the server address; compare the server's own message
        out[target] += (msg[msg.find("FATAL"):].strip() if "FATAL" in msg else msg,)
    assert out["proxy"] == out["direct"]
    assert "statement_timeout" in out["direct"][2] or "sy_no_such_setting_x" in out["direct"][2]


@pytest.mark.parametrize("target", TARGETS)
def test_statement_timeout(connect, target):
    conn = connect(target, autocommit=True)
    conn.execute("set statement_timeout = '200ms'")
    t0 = time.monotonic()
    with pytest.raises(errors.QueryCanceled) as ei:
        conn.execute("select pg_sleep(3)")
    assert time.monotonic() - t0 < 2
    assert ei.value.diag.message_primary == "canceling statement due to statement timeout"
    assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("target", TARGETS)
def test_idle_in_transaction_timeout_fatal(connect, target):
    """The server sends FATAL 25P03 on its own while the client is idle."""
    conn = connect(target)
    conn.execute("set idle_in_transaction_session_timeout = '150ms'")
    conn.execute("select 1")
    time.sleep(0.6)
    with pytest.raises(psycopg.Error) as ei:
        conn.execute("select 2")
    assert isinstance(ei.value, errors.IdleInTransactionSessionTimeout), repr(ei.value)
    assert ei.value.sqlstate == "25P03"
    assert conn.closed or conn.broken


@pytest.mark.parametrize("target", TARGETS)
def test_pg_cancel_backend_from_other_session(connect, target):
    victim = connect(target, autocommit=True)
    other = connect("direct", autocommit=True)
    pid = victim.info.backend_pid
    timer = threading.Timer(0.3, lambda: other.execute("select pg_cancel_backend(%s)", (pid,)))
    timer.start()
    try:
        with pytest.raises(errors.QueryCanceled):
            victim.execute("select pg_sleep(5)")
    finally:
        timer.join()
    assert victim.execute("select pg_backend_pid()").fetchone() == (pid,)


def test_large_values(connect):
    big = bytes(range(256)) * (8 * 1024 * 4)  # 8 MiB
    text = "é" * (3 * 1024 * 1024)  # 6 MiB UTF-8

    def run(conn):
        r1 = conn.execute("select length(%s::bytea), md5(%s::bytea)", (big, big)).fetchone()
        r2 = conn.execute("select %b::bytea", (big,), binary=True).fetchone()[0] == big
        r3 = conn.execute("select %s::text", (text,)).fetchone()[0] == text
        r4 = conn.execute("select repeat('x', 5000000)").fetchone()[0] == "x" * 5000000
        long_sql = "select length('" + "ab" * 200000 + "')"  # ~400 kB simple query
        r5 = conn.execute(long_sql).fetchone()
        return r1, r2, r3, r4, r5

    res = {t: run(connect(t, autocommit=True)) for t in TARGETS}
    assert res["proxy"] == res["direct"]
    assert res["direct"][1:] == (True, True, True, (400000,))


def test_many_parameters(connect):
    n = 5000
    q = "select array[" + ", ".join(f"%s::int + {i}" for i in range(n)) + "]"

    def run(conn):
        return conn.execute(q, list(range(n))).fetchone()

    res = {t: run(connect(t, autocommit=True)) for t in TARGETS}
    assert res["proxy"] == res["direct"] == ([2 * i for i in range(n)],)


def test_large_values_asyncpg(apg_params):
    big = b"\x01\x02" * (2 * 1024 * 1024)

    async def run():
        out = {}
        for t in TARGETS:
            conn = await asyncpg.connect(**apg_params(t))
            try:
                got = await conn.fetchval("select $1::bytea || $1::bytea", big)
                rows = await conn.fetch("select g, repeat('y', 1000) from generate_series(1, 20000) g")
                out[t] = (got == big + big, len(rows), rows[-1]["g"])
            finally:
                await conn.close()
        return out

    res = run_async(run())
    assert res["proxy"] == res["direct"] == (True, 20000, 20000)


def test_connection_churn(dsns):
    """Many short-lived connections, sequential and concurrent, all through the proxy."""
    for i in range(40):
        with psycopg.connect(dsns["proxy"], autocommit=True) as conn:
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    errs: list[BaseException] = []

    def worker(k):
        try:
            for j in range(5):
                with psycopg.connect(dsns["proxy"]) as conn:
                    conn.execute("select pg_sleep(0.01), %s", (k * 10 + j,)).fetchone()
        except BaseException as exc:  # collected and asserted below
            errs.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errs, errs[:3]


def test_close_mid_query_releases_session(dsns):
    """A client that goes away must not leave its session stuck holding locks."""
    from psycopg.conninfo import make_conninfo
    import uuid

    app = f"sy-close-{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(make_conninfo(dsns["proxy"], application_name=app), autocommit=True)
    pid = conn.info.backend_pid
    conn.pgconn.send_query(b"select pg_sleep(1)")
    time.sleep(0.1)
    conn.close()
    with psycopg.connect(dsns["direct"], autocommit=True) as d:
        deadline = time.monotonic() + 5
        while d.execute("select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, "backend of a closed proxied client still alive after 5 s"
            time.sleep(0.1)


def test_error_inside_function_context(connect):
    def run(conn):
        conn.execute(
            "create function pg_temp.sy_f(x int) returns int language plpgsql as "
            "$$ begin if x = 0 then raise exception using errcode = '22012', message = 'zero!'; end if; return 10 / x; end $$"
        )
        assert conn.execute("select pg_temp.sy_f(2)").fetchone() == (5,)
        with pytest.raises(errors.DivisionByZero) as ei:
            conn.execute("select pg_temp.sy_f(%s)", (0,))
        return diag_summary(ei.value.diag)

    res = {t: run(connect(t, autocommit=True)) for t in TARGETS}
    assert res["proxy"] == res["direct"]
    assert res["direct"]["message_primary"] == "zero!"


def test_protocol_version_negotiation(dsns):
    """libpq >= 18 can ask for protocol 3.2; PostgreSQL < 18 answers with
    NegotiateProtocolVersion, which the proxy must relay so libpq falls back."""
    from psycopg.conninfo import make_conninfo

    extra = {"max_protocol_version": "3.2"} if psycopg.pq.version() >= 180000 else {}
    out = {}
    for target in TARGETS:
        with psycopg.connect(make_conninfo(dsns[target], **extra), autocommit=True) as conn:
            real_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            server_major = conn.info.server_version // 10000
            out[target] = (conn.pgconn.protocol_version, conn.info.backend_pid == real_pid, server_major)
    assert out["proxy"] == out["direct"]
    assert out["direct"][1] is True


def test_pipeline_large_output_without_sync(connect):
    """Thousands of queued queries producing ~15 MB of results before the final
    Sync: a relay that does not move both directions concurrently deadlocks."""

    def run(conn):
        curs = []
        with conn.pipeline():
            for i in range(1500):
                curs.append(conn.execute("select %s::int, repeat('x', 1000) from generate_series(1, 10)", (i,)))
        total = 0
        for c in curs:
            rows = c.fetchall()
            total += len(rows) * len(rows[0][1])
        return total, len(curs)

    t0 = time.monotonic()
    res = {t: run(connect(t, autocommit=True)) for t in TARGETS}
    assert res["proxy"] == res["direct"] == (15_000_000, 1500)
    assert time.monotonic() - t0 < 20


def test_large_copy_both_directions(connect):
    n = 100_000

    def gen():
        for i in range(n):
            yield f"{i}\t{'v' * 50}{i}\n".encode()

    def run(conn):
        conn.execute("create temp table t (id int, v text)")
        with conn.cursor().copy("copy t from stdin") as cp:
            buf = bytearray()
            for line in gen():
                buf += line
                if len(buf) > 65536:
                    cp.write(bytes(buf))
                    buf.clear()
            cp.write(bytes(buf))
        size = 0
        lines = 0
        with conn.cursor().copy("copy t to stdout") as cp:
            for chunk in cp:
                size += len(chunk)
                lines += bytes(chunk).count(b"\n")
        return conn.execute("select count(*), sum(id) from t").fetchone(), size, lines

    res = {t: run(connect(t, autocommit=True)) for t in TARGETS}
    assert res["proxy"] == res["direct"]
    assert res["direct"][0] == (n, n * (n - 1) // 2) and res["direct"][2] == n
