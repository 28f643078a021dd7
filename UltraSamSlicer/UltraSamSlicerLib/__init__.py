"""Slicer-side helpers of the UltraSam extension, shared by the module panels and the Segment Editor
effect (UltraSamSegmentEditorEffect/): MRML bridge, model settings, the connection to the server."""
