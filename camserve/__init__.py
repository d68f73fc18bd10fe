"""camserve: Grad-CAM for CNN classifiers from one ONNX graph, served over gRPC.

Pipeline: export (torch -> explainer ONNX graph) -> serve (onnxruntime + NumPy CAMs over
gRPC) -> client (overlays, masks, contours). See README.md.
"""

__version__ = "0.1.0"
