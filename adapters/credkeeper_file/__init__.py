"""Encrypted file store (placeholder, being written)."""
