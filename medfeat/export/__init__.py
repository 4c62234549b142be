"""Backbones and how they are exported and run: ``backbones`` (registry, model families,
weights, pooling), ``runtimes`` (ONNX export, ONNX Runtime, TensorRT, parity, the runtime
factory) and ``training`` (weights made here).
"""
