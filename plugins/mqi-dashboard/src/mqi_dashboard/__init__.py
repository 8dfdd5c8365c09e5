"""mqi-dashboard: the MQI host's web dashboard (Flask served by waitress).

A worker of ``kind: service`` with ``plugin: dashboard`` serves server-rendered pages
(overview, cases, case detail with a per-beam timeline, GPUs, workers, DLQ, audit log),
a JSON API under ``/api/``, ``/metrics`` (Prometheus text format) and ``/healthz``. It reads
the state database read-only with short-lived connections; retry/cancel go through the
conductor's steering methods and DLQ actions through the broker, each recorded in the
audit log with the person who did it.

Importing this package is cheap: Flask and waitress are imported when the service starts.
"""

__version__ = "0.1.0"
