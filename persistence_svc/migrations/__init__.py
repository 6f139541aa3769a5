"""The Alembic migration environment of the history schema (applied by persistence_svc.migrate)."""
