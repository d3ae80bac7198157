"""Models at rest: the bundle format, its preprocessing contract, the on-device model store,
the TensorRT engine cache, update validation and the pinned assets.

May import the shared vocabulary (runtime.errors, protocol, results, config), runtime.engines
and runtime.tasks, and devices/. Never runtime.daemon, runtime.client, exporters or
cloud_sync: exporters build bundles on top of this package, the daemon serves them.
"""
