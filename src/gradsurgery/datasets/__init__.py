"""Data sets generated in memory (no downloads)."""

from gradsurgery.datasets.synthetic import mmoe_synthetic

__all__ = ["mmoe_synthetic"]
