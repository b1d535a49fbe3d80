"""Evaluation: synthetic long-context retrieval tasks built locally (no downloads)."""
