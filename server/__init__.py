"""Server: explainer graphs on onnxruntime behind gRPC, maps computed with NumPy."""
