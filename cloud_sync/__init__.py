"""MQTT link to the cloud: telemetry up, signed OTA model updates down.

Nothing here yet: the cloud-sync issue builds it on the runtime's bundle format and daemon.
"""
