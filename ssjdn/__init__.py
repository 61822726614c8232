"""SSJDN: Scale-Semantic Joint Decoupling Network for remote-sensing image-text retrieval.

This package is the model library: pure PyTorch + transformers + Pillow/numpy.
It never imports Ray or Prefect; the Ray jobs live in `pipelines/`, the Prefect flows in `flows/`.
"""

__version__ = "0.1.0"
