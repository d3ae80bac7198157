"""Sightline runtime: bundles, engines, the ZeroMQ frame daemon and its client SDK.

    errors, protocol, results, config, curve_keys, overlay   shared vocabulary
    models/    bundles, model store, engine cache, validation, assets
    engines/   the Engine protocol, one module per backend
    tasks/     output decoders (face, detect, raw)
    spatial/   depth, anchors, planes, tracking
    daemon/    the per-frame path and what keeps the daemon alive
    client/    the headset SDK (no daemon dependencies)
    tools/     demo, bench, compare, service installer
    cli/       `sightline`, one module per command group

Importing this package must work on any machine: GPU stacks (TensorRT, CUDA) and torch are
imported only inside the modules that use them. Nothing here imports exporters or
cloud_sync at import time; the CLI composes them.
"""

__version__ = "0.1.0"
