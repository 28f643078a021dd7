"""Data layer: US-43d's COCO/RLE layout read and written, public data sets and volumes converted to it.

Qt-free, below both training (``ultrasam_training``) and evaluation (``ultrasam.evaluation``); it uses
only the core's basics (geometry, intensity, slicing, volume_io, atomic).
"""
