"""The daemon: everything that runs per frame or keeps the process alive.

Per frame: server.py (the ROUTER socket) -> latest.py (newest frame per client) ->
pipeline.py (decode.py, preprocessing, engine, task decoder, reply) -> spatial_stage.py.
Alive: security.py (ZAP), control.py + status.py (`sightline status`), service.py and
journal.py (systemd), metrics.py (Prometheus, telemetry counters), model_host.py (the seam
cloud_sync swaps models through). May import runtime.models, engines, tasks, spatial, the
shared vocabulary and devices/; never exporters or cloud_sync (the CLI hands in what it
needs from them).
"""
