"""EWMA feature normaliser: turns raw numbers of wildly different scales into clipped z-scores.

The GNN sees ``samples_per_s`` (thousands) next to ``learning_rate`` (thousandths); z-scores
against a running mean/variance keep every input near unit scale without a fitted dataset. The
exponentially weighted update (alpha 0.1, the prototype's) follows drift in a long run:

    delta = x - mean;  mean += alpha * delta;  var = (1 - alpha) * (var + alpha * delta**2)

``observe`` scores a value against the statistics *before* updating them, so a value is never
compared with a mean that already contains it. Starting points (REFERENCE §6.1) keep the first
packets of a run sane; a key with no default starts at ``(first value, 1.0)``.

State persists as JSON written atomically (``var/tamiyo/gnn_norms.json`` in the service); a
corrupt file raises ``NormaliserStateError`` rather than being silently replaced by defaults.
Not thread-safe: one normaliser per builder, one builder per worker thread.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from esper.core.errors import EsperError
from esper.tamiyo.registry import write_json_atomic

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_CLIP",
    "NORMALISER_DEFAULTS",
    "FeatureNormaliser",
    "NormaliserStateError",
]

DEFAULT_ALPHA: Final[float] = 0.1
DEFAULT_CLIP: Final[float] = 10.0
VAR_FLOOR: Final[float] = 1e-6
FORMAT_VERSION: Final[int] = 1

# (mean, std) starting points. Prototype values where it had them; log-scale keys start at the log
# of the prototype's typical raw value (the prototype fed log values into raw-scale defaults).
NORMALISER_DEFAULTS: Final[Mapping[str, tuple[float, float]]] = {
    "loss": (0.8, 0.3),
    "validation_loss": (0.8, 0.3),
    "training_loss": (0.8, 0.3),
    "gradient_norm": (1.0, 0.5),
    "samples_per_s": (4500.0, 500.0),
    "hook_latency_ms": (12.0, 6.0),
    "global_log_step": (math.log1p(1000.0), 2.0),
    "seed_learning_rate": (0.01, 0.005),
    "seed_risk": (0.4, 0.2),
    "seed_gradient_norm": (1.0, 0.5),
    "seed_age": (10.0, 4.0),
    "seed_layer_depth": (2.0, 2.0),
    "blueprint_log_parameter_count": (math.log1p(2048.0), 1.0),
    "blueprint_candidate_score": (0.5, 0.25),
    "layer_latency_ms": (6.0, 2.0),
    "layer_log_parameter_count": (math.log1p(1024.0), 2.0),
    "layer_weight_norm": (1.0, 0.4),
    "layer_gradient_norm": (0.8, 0.4),
    "activation_gradient_flow": (0.8, 0.2),
    "activation_log_cost": (math.log1p(128.0), 1.0),
    "activation_nonlinearity": (0.5, 0.2),
    "parameter_min": (0.0, 0.5),
    "parameter_max": (1.0, 0.5),
    "parameter_span": (0.5, 0.4),
    "parameter_default": (0.5, 0.4),
}


class NormaliserStateError(EsperError):
    """The persisted normaliser state is unreadable or holds impossible statistics."""


class FeatureNormaliser:
    """Per-key EWMA mean/variance; ``observe`` is the builder's fused score-then-update path."""

    __slots__ = ("_stats", "alpha", "clip", "dirty")

    def __init__(
        self,
        *,
        alpha: float = DEFAULT_ALPHA,
        clip: float = DEFAULT_CLIP,
        defaults: Mapping[str, tuple[float, float]] = NORMALISER_DEFAULTS,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not clip > 0.0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.alpha = alpha
        self.clip = clip
        self.dirty = False
        # key -> [mean, var, count]; lists so the hot path mutates in place.
        self._stats: dict[str, list[float]] = {
            key: [float(mean), max(float(std) ** 2, VAR_FLOOR), 0.0] for key, (mean, std) in defaults.items()
        }

    def stats(self, key: str) -> tuple[float, float, int] | None:
        """(mean, variance, observations) for a key, or None if it was never seen nor defaulted."""
        st = self._stats.get(key)
        return None if st is None else (st[0], st[1], int(st[2]))

    def known_keys(self) -> list[str]:
        """Every key with statistics (defaults included)."""
        return list(self._stats)

    def normalise(self, key: str, value: float) -> float:
        """Clipped z-score of ``value`` against the current statistics (0.0 for an unknown key)."""
        st = self._stats.get(key)
        if st is None:
            return 0.0
        z = (value - st[0]) / math.sqrt(st[1])
        clip = self.clip
        return clip if z > clip else -clip if z < -clip else z

    def update(self, key: str, value: float) -> None:
        """Fold one observation into the key's EWMA mean and variance."""
        st = self._stats.get(key)
        if st is None:
            self._stats[key] = [float(value), 1.0, 1.0]
        else:
            alpha = self.alpha
            delta = value - st[0]
            st[0] += alpha * delta
            var = (1.0 - alpha) * (st[1] + alpha * delta * delta)
            st[1] = var if var > VAR_FLOOR else VAR_FLOOR
            st[2] += 1.0
        self.dirty = True

    def observe(self, key: str, value: float) -> float:
        """``normalise`` then ``update`` in one lookup: the score uses the statistics before ``value``."""
        st = self._stats.get(key)
        self.dirty = True
        if st is None:
            self._stats[key] = [float(value), 1.0, 1.0]
            return 0.0
        mean = st[0]
        var = st[1]
        delta = value - mean
        z = delta / math.sqrt(var)
        alpha = self.alpha
        st[0] = mean + alpha * delta
        var = (1.0 - alpha) * (var + alpha * delta * delta)
        st[1] = var if var > VAR_FLOOR else VAR_FLOOR
        st[2] += 1.0
        clip = self.clip
        return clip if z > clip else -clip if z < -clip else z

    # -- persistence -------------------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        stats = {k: {"mean": v[0], "var": v[1], "count": int(v[2])} for k, v in dict(self._stats).items()}
        return {"format": FORMAT_VERSION, "alpha": self.alpha, "stats": stats}

    def save(self, path: Path) -> None:
        """Persist atomically (temp file, fsync, rename, fsync directory)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_json())
        self.dirty = False

    @classmethod
    def load(cls, path: Path, *, alpha: float = DEFAULT_ALPHA, clip: float = DEFAULT_CLIP) -> FeatureNormaliser:
        """Restore saved statistics over the defaults; ``FileNotFoundError`` if absent."""
        path = Path(path)
        try:
            obj = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NormaliserStateError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_VERSION or not isinstance(obj.get("stats"), dict):
            raise NormaliserStateError(f"{path}: not a format-{FORMAT_VERSION} normaliser state")
        norm = cls(alpha=alpha, clip=clip)
        for key, entry in obj["stats"].items():
            norm._stats[key] = _parse_entry(path, key, entry)
        return norm

    @classmethod
    def load_or_default(
        cls, path: Path, *, alpha: float = DEFAULT_ALPHA, clip: float = DEFAULT_CLIP
    ) -> FeatureNormaliser:
        """Load if the file exists, else start from the defaults. A corrupt file still raises."""
        try:
            return cls.load(path, alpha=alpha, clip=clip)
        except FileNotFoundError:
            return cls(alpha=alpha, clip=clip)


def _parse_entry(path: Path, key: str, entry: object) -> list[float]:
    if not isinstance(entry, dict):
        raise NormaliserStateError(f"{path}: stats[{key!r}] is not an object")
    mean, var, count = entry.get("mean"), entry.get("var"), entry.get("count", 0)
    numbers_ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (mean, var, count))
    if not numbers_ok:
        raise NormaliserStateError(f"{path}: stats[{key!r}] has non-numeric fields")
    assert isinstance(mean, int | float) and isinstance(var, int | float) and isinstance(count, int | float)
    if not (math.isfinite(mean) and math.isfinite(var) and var > 0.0 and count >= 0):
        raise NormaliserStateError(f"{path}: stats[{key!r}] = {entry!r} is not a finite mean with positive variance")
    return [float(mean), max(float(var), VAR_FLOOR), float(count)]
