"""Backbones: the registry, tap specs, weight loading, pooling, FLOP counts, and one
module per model family under ``models/``.
"""
