"""Sightline runtime: bundles, engines, the ZeroMQ frame daemon and its client SDK.

Importing this package must work on any machine: GPU stacks (TensorRT, CUDA) and
torch are imported only inside the modules that use them.
"""

__version__ = "0.1.0"
