"""Slicer-side parts of the UltraSam extension: the Segment Editor effect and its Qt-free helpers."""
