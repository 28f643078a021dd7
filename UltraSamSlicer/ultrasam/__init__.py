"""UltraSam for 3D ultrasound: the Qt-free core of the UltraSamSlicer extension.

Importing this package loads nothing heavy; import the submodules you need
(``ultrasam.checkpoint``, ``ultrasam.predictor``, ``ultrasam.volume_io``, ...).
"""

__version__ = "0.1.0"
