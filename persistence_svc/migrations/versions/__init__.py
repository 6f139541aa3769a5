"""Alembic revisions, oldest first; each runs unchanged on SQLite and PostgreSQL."""
