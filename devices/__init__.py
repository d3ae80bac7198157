"""Hardware knowledge: which Jetson or GPU this is, how to reach its memory, how hot it is.

A leaf package: it imports nothing of Sightline's, and imports vendor libraries lazily.
"""
