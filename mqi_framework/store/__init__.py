"""The state database: schema, migrations and the queries shared by CLI, conductor and dashboard."""

from mqi_framework.store.db import StoreError, backup, connect, migrate, open_state, transaction

__all__ = ["StoreError", "backup", "connect", "migrate", "open_state", "transaction"]
