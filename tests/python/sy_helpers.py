"""Helpers shared by the driver-compatibility tests (imported by conftest and tests)."""

from __future__ import annotations

import asyncio
import re

from psycopg.conninfo import conninfo_to_dict

TARGETS = ("direct", "proxy")
# Keep every single network wait bounded so a misbehaving proxy fails a test
# instead of hanging the suite.
CONNECT_TIMEOUT = 10


# --------------------------------------------------------------------------
# asyncpg helpers


def asyncpg_params(dsn: str, **server_settings) -> dict:
    """Translate a libpq DSN (keyword/value or URL) to asyncpg.connect kwargs."""
    d = conninfo_to_dict(dsn)
    kw: dict = {}
    if d.get("host"):
        kw["host"] = d["host"]
    if d.get("port"):
        kw["port"] = int(d["port"])
    if d.get("user"):
        kw["user"] = d["user"]
    if d.get("password"):
        kw["password"] = d["password"]
    if d.get("dbname"):
        kw["database"] = d["dbname"]
    sslmode = d.get("sslmode")
    if sslmode:
        kw["ssl"] = sslmode
    settings = dict(server_settings)
    if d.get("application_name"):
        settings.setdefault("application_name", d["application_name"])
    if settings:
        kw["server_settings"] = settings
    kw["timeout"] = float(d.get("connect_timeout") or CONNECT_TIMEOUT)
    return kw


def run_async(coro, timeout: float = 30):
    """Run a coroutine to completion with an overall deadline."""

    async def _bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(_bounded())


# --------------------------------------------------------------------------
# comparison helpers


_TEMP_SCHEMA = re.compile(r"\bpg_temp_\d+\b")


def _untemp(v):
    # temp schemas are per backend (pg_temp_3 vs pg_temp_4): compare the kind
    return _TEMP_SCHEMA.sub("pg_temp", v) if isinstance(v, str) else v


def diag_summary(diag) -> dict:
    """The parts of an error/notice that must be identical direct vs proxy."""
    return {k: _untemp(v) for k, v in _diag_fields(diag).items()}


def _diag_fields(diag) -> dict:
    return {
        "severity": diag.severity,
        "severity_nonlocalized": diag.severity_nonlocalized,
        "sqlstate": diag.sqlstate,
        "message_primary": diag.message_primary,
        "message_detail": diag.message_detail,
        "message_hint": diag.message_hint,
        "statement_position": diag.statement_position,
        "context": diag.context,
        "schema_name": diag.schema_name,
        "constraint_name": diag.constraint_name,
        "column_name": diag.column_name,
        "datatype_name": diag.datatype_name,
    }
