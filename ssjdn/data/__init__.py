"""Dataset records, readers, image decoding and the synthetic dataset generator."""

from ssjdn.data.record import SPLITS, Sample

__all__ = ["SPLITS", "Sample"]
