"""Training UltraSam-architecture models: US-43d data, UltraSam's recipe, distributed jobs.

Qt-free; the Slicer module UltraSamTraining only configures, launches and watches it. Entry point:
``ultrasam train ...`` (or ``ultrasam-train``); see docs/TRAINING.md.
"""
