"""Transformer building blocks: pure numerics plus thin Linen modules holding their parameters."""
