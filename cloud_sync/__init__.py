"""MQTT link to the cloud: telemetry up, signed OTA model updates down.

Built so far: the topic tree (topics.py), a persistent store-and-forward outbox (outbox.py),
the MQTT link with TLS, Last Will and reconnects (link.py) and the telemetry publisher
(telemetry.py). OTA updates and the fleet CLI are not built yet.
"""
