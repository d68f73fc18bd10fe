"""The NumPy core of an explanation, shared by the server and every client path.

image (decode, preprocess) -> pipeline (request -> model input -> maps) -> methods (the CAM
registry, normalisation, layer fusion), smoothing, attributions (input-space methods),
geometry (maps back onto the photo), frames (raw camera frames), regions (maps as polygons
and boxes). Imports numpy, OpenCV and protobuf only.
"""
