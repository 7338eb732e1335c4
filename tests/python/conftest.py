"""Driver-compatibility suite: the same scenarios run directly against
PostgreSQL and through the Switchyard proxy, and the results are compared.

Targets come from the environment (libpq keyword/value or URL strings, both
pointing at the same database):

    SWITCHYARD_TEST_DIRECT_DSN   straight to PostgreSQL
    SWITCHYARD_TEST_PROXY_DSN    through the proxy

If either is missing every test fails (on purpose: a harness always sets both).

    pip install -r tests/python/requirements.txt
    SWITCHYARD_TEST_DIRECT_DSN="host=127.0.0.1 port=5432 dbname=db user=postgres" \
    SWITCHYARD_TEST_PROXY_DSN="host=127.0.0.1 port=6432 dbname=db user=postgres sslmode=disable" \
    python -m pytest tests/python
"""

from __future__ import annotations

import os
import uuid

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from sy_helpers import CONNECT_TIMEOUT, asyncpg_params

DIRECT_ENV = "SWITCHYARD_TEST_DIRECT_DSN"
PROXY_ENV = "SWITCHYARD_TEST_PROXY_DSN"


def _read_env() -> dict[str, str] | str:
    missing = [name for name in (DIRECT_ENV, PROXY_ENV) if not os.environ.get(name, "").strip()]
    if missing:
        return (
            f"environment variable(s) {', '.join(missing)} not set: this suite compares "
            f"PostgreSQL reached directly ({DIRECT_ENV}) with the same database reached "
            f"through the Switchyard proxy ({PROXY_ENV}); both must be libpq DSNs "
            "(keyword/value or URL) pointing at the same database"
        )
    return {"direct": os.environ[DIRECT_ENV].strip(), "proxy": os.environ[PROXY_ENV].strip()}


def _with_timeout(dsn: str) -> str:
    if "connect_timeout" in conninfo_to_dict(dsn):
        return dsn
    return make_conninfo(dsn, connect_timeout=CONNECT_TIMEOUT)


@pytest.fixture(scope="session", autouse=True)
def dsns() -> dict[str, str]:
    """Both DSNs; fails (never skips) every test when one is missing or unusable."""
    env = _read_env()
    if isinstance(env, str):
        pytest.fail(env, pytrace=False)
    out = {k: _with_timeout(v) for k, v in env.items()}
    seen = {}
    for target, dsn in out.items():
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                seen[target] = conn.execute("select current_database()").fetchone()[0]
        except psycopg.Error as exc:
            pytest.fail(f"cannot connect to the {target} target ({dsn!r}): {exc}", pytrace=False)
    if seen["direct"] != seen["proxy"]:
        pytest.fail(
            f"{DIRECT_ENV} and {PROXY_ENV} must point at the same database: "
            f"direct is {seen['direct']!r}, proxy is {seen['proxy']!r}",
            pytrace=False,
        )
    return out


@pytest.fixture
def connect(dsns):
    """connect(target, **kwargs) -> psycopg.Connection, closed at teardown."""
    opened: list[psycopg.Connection] = []

    def _connect(target: str, *, dsn_extra: dict | None = None, **kwargs) -> psycopg.Connection:
        dsn = dsns[target]
        if dsn_extra:
            dsn = make_conninfo(dsn, **dsn_extra)
        conn = psycopg.connect(dsn, **kwargs)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        try:
            conn.close()
        except Exception:
            pass


@pytest.fixture
def uniq() -> str:
    """A unique lowercase identifier prefix for objects this test creates."""
    return f"sy_pytest_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def cleanup(dsns):
    """cleanup(sql) registers a statement run directly against PostgreSQL at teardown."""
    stmts: list[str] = []
    yield stmts.append
    if stmts:
        with psycopg.connect(dsns["direct"], autocommit=True) as conn:
            for sql in reversed(stmts):
                conn.execute(sql)


@pytest.fixture
def apg_params(dsns):
    """apg_params(target) -> kwargs for asyncpg.connect / create_pool."""
    return lambda target, **settings: asyncpg_params(dsns[target], **settings)


def pytest_report_header(config):
    env = _read_env()
    if isinstance(env, str):
        return [f"switchyard: {env}"]
    return [f"switchyard: direct={env['direct']!r} proxy={env['proxy']!r}"]
