"""Urza's Prometheus metrics, on an injected registry (a fresh one per test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["FETCH_BUCKETS_S", "KERNEL_RESULTS", "UrzaMetrics"]

# Fetches are budgeted at 10 ms by Kasmina (REFERENCE_PROTOTYPE §7): buckets around it.
FETCH_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Bounded `result` label values of urza_kernel_requests_total.
KERNEL_RESULTS = ("ready", "missing_id", "missing_artifact", "checksum_mismatch", "artifact_format",
                  "artifact_not_found", "stale", "replay")


class UrzaMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.kernel_requests = Counter("urza_kernel_requests_total", "Kernel prefetch requests by result",
                                       ["result"], registry=r)
        for result in KERNEL_RESULTS:
            self.kernel_requests.labels(result)
        self.kernel_stale_dropped = Counter(
            "urza_kernel_stale_dropped_total",
            "Kernel requests dropped: issued_at missing, or outside the freshness window", registry=r)
        self.kernel_replay_dropped = Counter(
            "urza_kernel_replay_dropped_total", "Kernel requests dropped: request_id seen before", registry=r)
        self.fetch_latency = Histogram("urza_kernel_fetch_seconds", "Catalogue lookup + verified artifact read",
                                       buckets=FETCH_BUCKETS_S, registry=r)
        self.catalog_queries = Counter("urza_catalog_queries_total", "BlueprintQuery requests answered",
                                       registry=r)
        self.bsds_stored = Counter("urza_bsds_stored_total", "BSDS sheets stored in extras", registry=r)
        self.bsds_rejected = Counter("urza_bsds_rejected_total", "BSDSIssued messages refused", ["reason"],
                                     registry=r)
        self.telemetry_dropped = Counter("urza_telemetry_dropped_total", "Telemetry packets not sent",
                                         ["reason"], registry=r)
