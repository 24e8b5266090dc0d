"""Serving benchmark: in-process ONNX Runtime limits against the gRPC service over loopback."""
