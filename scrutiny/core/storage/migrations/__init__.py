"""Alembic migrations of Scrutiny's tables (own version table, configurable table prefix)."""
