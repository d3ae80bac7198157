"""MQTT link to the cloud: telemetry and status up, signed OTA model updates down, and the
operator's side (push, rollback, fleet).

May import runtime (the model store, validation, and the daemon's narrow ModelHost seam)
and devices; runtime never imports this package at import time (the CLI composes it).
"""
