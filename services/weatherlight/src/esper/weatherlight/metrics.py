"""Weatherlight's own metrics (prototype: weatherlight.{tasks.running, uptime_s, restarts_total}, system mode)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class WeatherlightMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.running = Gauge("weatherlight_services_running", "Supervised processes alive", registry=r)
        self.up = Gauge("weatherlight_service_up", "1 while the service's process is alive", ["service"], registry=r)
        self.restarts = Counter("weatherlight_restarts", "Restarts after a crash", ["service"], registry=r)
        self.uptime = Gauge("weatherlight_uptime_seconds", "Seconds since the fleet started", registry=r)
        self.mode = Gauge("weatherlight_system_mode", "EmergencyLevel of the fleet (0 normal … 4 HALT)", registry=r)
        self.signals = Counter("weatherlight_emergency_signals", "EmergencySignals seen on the emergency lane",
                               ["level"], registry=r)
