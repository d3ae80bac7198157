"""The AR spatial layer: detections lifted into 3D (anchors), surfaces (planes), and stable
track ids with One Euro smoothing.

numpy-only except `planes` and the oriented boxes in `anchors`, which import Open3D lazily
(`pip install 'sightline[spatial]'`); importing this package never imports Open3D.
"""
