"""Nissa: Esper's observer. Turns Leyline telemetry and field reports from the bus into `esper_*`
Prometheus metrics, evaluates alert rules and SLO burn, and serves /metrics, /healthz and /alerts.

Modules, one job each: `labels` (bounded label values), `mapping` (packet → update, pure), `metrics`
(the Prometheus contract), `alerts` (rule engine), `rules` (the fleet's rules and SLOs), `slo` (burn
arithmetic), `steps` (training-step progress), `ingest` (applies updates), `routes` (/alerts),
`service` (bus wiring), `settings`.
"""
