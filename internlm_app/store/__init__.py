"""Conversations on disk (SQLite), their tree of versions, export and import."""
