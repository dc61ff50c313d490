"""Tezzeret's Prometheus metrics (prototype: `tezzeret.compile.retry_count`), on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from esper.tezzeret.compiler import CompileResult

_MS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TezzeretMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.compile_seconds = Histogram("tezzeret_compile_seconds", "Build + validate + warm-up per kernel",
                                         ["mode"], buckets=_MS_BUCKETS, registry=registry)
        self.retries = Counter("tezzeret_compile_retry_count", "Compile attempts that failed and were retried",
                               registry=registry)
        self.fallbacks = Counter("tezzeret_compile_fallback", "Requested torch.compile that fell back to eager",
                                 ["reason"], registry=registry)
        self.registered = Counter("tezzeret_kernels_registered", "Kernels registered in Urza", registry=registry)
        self.failures = Counter("tezzeret_compile_failures", "Kernels that could not be compiled", ["reason"],
                                registry=registry)

    def observe(self, result: CompileResult) -> None:
        self.compile_seconds.labels(result.mode).observe(result.compile_ms / 1000.0)
        self.retries.inc(result.retries)
        if result.fallback_reason:
            self.fallbacks.labels(result.fallback_reason.split(":")[0]).inc()
        self.registered.inc()
