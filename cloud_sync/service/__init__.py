"""The fleet service (`sightline cloud serve`): the cloud side that keeps history.

It consumes what devices publish (status, telemetry, OTA progress) through a persistent
MQTT 5 session and records it in a database: the device registry, each device's model
version history and how every change ended, rollouts and their per-device steps, and
telemetry series with retention and downsampling. It serves fleet metrics for Prometheus
and a read-only JSON API, and gives `sightline push` the telemetry gate for canaries.

Modules: models (SQLAlchemy 2 tables), migrations/ (Alembic, run on start), database
(engine, URL, migrate), ingest (MQTT -> database), records (what one message changes),
metrics (Prometheus collector), api (HTTP), gate (canary telemetry analysis), cli.
May import the rest of cloud_sync and runtime.errors; nothing outside imports it at
import time (sqlalchemy and alembic are the `sightline[cloud]` extra).
"""
