"""Runtimes: ONNX export with parity reports, ONNX Runtime sessions, TensorRT engines,
the content-keyed artefact cache, the precision audit, and the factory that builds a
runtime for a backbone.
"""
