"""Data sets generated in memory (no downloads)."""

from gradsurgery.datasets.gradnorm_toy import gradnorm_toy
from gradsurgery.datasets.planted_clusters import planted_clusters, planted_clusters_model
from gradsurgery.datasets.synthetic import mmoe_synthetic

__all__ = ["gradnorm_toy", "mmoe_synthetic", "planted_clusters", "planted_clusters_model"]
