"""``camserve evaluate``: quantitative scores of CAM maps, in-process on onnxruntime.

    metrics.py  the metrics, pure NumPy/OpenCV (deletion, insertion, drop, pointing, IoU)
    scoring.py  one image: its map from the explain pipeline, the scores of a map
    report.py   means over images, the Markdown table, the curves plot, evaluation.json
    cli.py      the command
"""
