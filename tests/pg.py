"""A throwaway PostgreSQL database for tests that need a real server.

``tests/conftest.py`` loads this module as a plugin (``pytest_plugins``), so ``pg_url`` is available
everywhere; without that, import it with ``from tests.pg import pg_url  # noqa: F401``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _conninfo(url: str) -> str:
    """A libpq URL from a SQLAlchemy-style one (``postgresql+psycopg://`` -> ``postgresql://``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _server_url() -> str:
    return os.environ.get("TEST_PG_URL") or DEFAULT_PG_URL


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh ``catena_test_<random>`` database, dropped at the end of the session."""
    server = _server_url()
    shown = make_url(server).render_as_string(hide_password=True)
    try:
        admin = psycopg.connect(_conninfo(server), autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL not reachable at {shown}; start one or set TEST_PG_URL ({exc})"
        admin = None
    if admin is None:
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    name = f"catena_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield _conninfo(make_url(server).set(database=name).render_as_string(False))
        finally:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def fresh_schema_url(url: str) -> str:
    """``url`` with a new schema first on its search path: isolation without a new database."""
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    return (
        make_url(url)
        .update_query_dict({"options": f"-csearch_path={name}"})
        .render_as_string(hide_password=False)
    )
