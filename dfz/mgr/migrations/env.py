"""Alembic's environment for the manager: migrations run on the connection that
:meth:`dfz.mgr.db.Database.upgrade` passes in (``config.attributes["connection"]``), or on the URL given
as ``-x url=...`` to the ``alembic`` command.

Writing a revision after changing ``models.py``: migrate a scratch database to the current head, then let
Alembic compare it with the models (there is no alembic.ini; a two-line one names this directory)::

    printf '[alembic]\nscript_location = dfz/mgr/migrations\n' > /tmp/alembic.ini
    python -c 'from dfz.mgr.db import Database; Database("sqlite:////tmp/scratch.db").upgrade()'
    alembic -c /tmp/alembic.ini -x url=sqlite:////tmp/scratch.db revision --autogenerate --rev-id 0002 -m "what changed"

Read the result: SQLite changes tables in batch mode (copy and rename), and data must be moved by hand.
``tests/test_mgr.py`` fails while the models and the migrated schema differ.
"""

from __future__ import annotations

from typing import Any, Literal

import sqlalchemy as sa
from alembic import context
from sqlmodel import SQLModel

from dfz.mgr import models
from dfz.mgr.db import Database

config = context.config
target_metadata = SQLModel.metadata


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Write the manager's column types as plain SQLAlchemy types, so revisions do not import dfz."""
    if type_ == "type" and isinstance(obj, models.UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and obj is models.JSONDoc:
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return "sa.JSON().with_variant(postgresql.JSONB(), 'postgresql')"
    return False


def run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        render_item=render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite:///PATH ... (or postgresql://...)")
    database = Database(url)
    try:
        with database.engine.connect() as conn:
            run(conn)
    finally:
        database.close()
