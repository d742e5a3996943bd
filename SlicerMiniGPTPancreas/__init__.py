"""Shared core of MiniGPT-Pancreas for 3D Slicer.

Pure Python + numpy (+ requests for the client). Everything both sides of the wire must agree on lives here once:
the answer grammar, the slice preprocessing, the model-view geometry, the metrics, the HTTP protocol, the client,
and synthetic CT phantoms. Import the submodules you need; this package imports none of them eagerly, so the Slicer
module can use the client without loading numpy-heavy parts it does not need.
"""

__version__ = "0.1.0"
