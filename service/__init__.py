"""Serving side: preprocessing, bundle reader, ONNX Runtime scorer, gRPC service, client."""
