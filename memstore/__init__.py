"""Engram memstore: a memory-tier store for Engram's hashed N-gram embedding tables."""

__version__ = "0.1.0"
