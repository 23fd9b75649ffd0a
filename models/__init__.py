"""Tensors: everything that touches torch and transformers lives in this package."""
