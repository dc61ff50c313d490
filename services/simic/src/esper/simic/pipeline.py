"""One round of Simic's loop: replay store → samples → train a candidate → gate → checkpoint.

The candidate starts from the current policy's weights and has the *serving* architecture
(`GNNConfig()`: Tamiyo refuses other widths as `shape_mismatch`). The checkpoint is Tamiyo's format
(`encode_checkpoint`: weights only, architecture version, registry schema, digest and entries).
"""

from __future__ import annotations

import copy
import hashlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from esper.core.errors import DependencyViolationError
from esper.core.files import write_bytes_atomic
from esper.leyline import new_message_id, pb
from esper.oona import OonaClient
from esper.simic.dataset import RewardConfig, Sample, build_samples, split_by_run
from esper.simic.settings import SimicSettings
from esper.simic.training import GateResult, TrainConfig, TrainReport, check_cancel, gate, train_policy
from esper.tamiyo.catalog import blueprint_from_entry
from esper.tamiyo.checkpoint import decode_checkpoint, encode_checkpoint
from esper.tamiyo.gnn import GNNConfig, TamiyoGNN
from esper.tamiyo.metadata import BlueprintInfo
from esper.tamiyo.normaliser import FeatureNormaliser
from esper.tamiyo.registry import REGISTRY_FILE, RegistrySet

__all__ = ["RoundResult", "fetch_blueprints", "initial_model", "load_model", "run_round", "save_checkpoint"]

def initial_model(config: GNNConfig | None = None) -> TamiyoGNN:
    """The weights a Tamiyo without a stored policy serves (its `initial_policy`: seed 0)."""
    torch.manual_seed(0)
    return TamiyoGNN(config or GNNConfig()).eval()


def load_model(checkpoint: Path | bytes, registries: RegistrySet) -> tuple[TamiyoGNN, str]:
    """A checkpoint as Tamiyo would serve it (validated the same way); returns (model, version)."""
    data = checkpoint if isinstance(checkpoint, bytes) else Path(checkpoint).read_bytes()
    decoded = decode_checkpoint(data)
    return decoded.build_model(GNNConfig(), registries), decoded.policy_version


async def fetch_blueprints(client: OonaClient, *, timeout_ms: float) -> tuple[BlueprintInfo, ...]:
    """Urza's catalogue (with graphs), as Tamiyo's metadata refresher gets it."""
    query = pb.BlueprintQuery(request_id=new_message_id(), include_graph=True)
    reply = await client.request("blueprint.query", query, timeout_ms=timeout_ms)
    out = []
    for entry in reply.message_as(pb.BlueprintCatalog).entries:
        try:
            out.append(blueprint_from_entry(entry))
        except DependencyViolationError:
            continue
    return tuple(out)


def registries_and_norms(settings: SimicSettings) -> tuple[RegistrySet, FeatureNormaliser]:
    """Tamiyo's registries when `SIMIC_TAMIYO_VAR_DIR` names its var dir, else fresh ones; always a fresh
    normaliser (`build_samples` replays the packets through it in issue order, as Tamiyo saw them)."""
    var = settings.tamiyo_var_dir
    if var is None:
        return RegistrySet.new(), FeatureNormaliser()
    registries = RegistrySet.load(var) if (var / REGISTRY_FILE).exists() else RegistrySet.new()
    return registries, FeatureNormaliser()  # norms are rebuilt by replaying the packets in order


@dataclass(frozen=True, slots=True)
class RoundResult:
    candidate: TamiyoGNN
    gate: GateResult
    train: TrainReport
    checkpoint: bytes
    policy_version: str
    samples: int
    holdout: int
    actions: dict[str, int]


def train_config(settings: SimicSettings) -> TrainConfig:
    return TrainConfig(learning_rate=settings.learning_rate, fate_steps=settings.fate_steps,
                       fate_polish_steps=settings.fate_steps,
                       imitation_epochs=settings.imitation_epochs,
                       awr_epochs=settings.awr_epochs, batch_size=settings.batch_size, awr_beta=settings.awr_beta,
                       max_weight=settings.awr_max_weight, value_weight=settings.value_weight,
                       balance_actions=settings.balance_actions, max_balance=settings.max_balance,
                       seed=settings.train_seed)


def run_round(reports: Sequence[pb.FieldReport], current: TamiyoGNN, settings: SimicSettings, *,
              blueprints: Sequence[BlueprintInfo] = (), registries: RegistrySet | None = None,
              normaliser: FeatureNormaliser | None = None, policy_version: str | None = None,
              cancel: threading.Event | None = None) -> RoundResult:
    """Train a candidate from `current` on the training runs of `reports` and gate it on the held-out
    runs. The checkpoint is produced either way; publish it only when `result.gate.accepted`. A set
    `cancel` ends the round between its phases or optimizer steps with `TrainingCancelled`."""
    registries = registries or RegistrySet.new()
    rewards = RewardConfig(gamma=settings.gamma, gae_lambda=settings.gae_lambda,
                           outcome_reward=settings.outcome_reward, fate_reward=settings.fate_reward,
                           fate_min_improvement=settings.fate_min_improvement)
    check_cancel(cancel)
    samples = build_samples(reports, blueprints=blueprints, registries=registries, normaliser=normaliser,
                            rewards=rewards, max_blueprints=settings.max_blueprints)
    train, holdout = split_by_run(samples, settings.holdout_fraction)
    candidate = copy.deepcopy(current)
    report = train_policy(candidate, train, train_config(settings), cancel=cancel)
    check_cancel(cancel)
    verdict = gate(candidate, current, holdout, margin=settings.gate_margin, min_holdout=settings.gate_min_holdout)
    version = policy_version or _version(samples, report)
    data = encode_checkpoint(candidate, registries, policy_version=version)
    return RoundResult(candidate, verdict, report, data, version, len(samples), len(holdout), _actions(samples))


def _version(samples: Sequence[Sample], report: TrainReport) -> str:
    ids = hashlib.sha256("\n".join(sorted(s.report_id for s in samples)).encode()).hexdigest()[:8]
    return f"simic-{len(samples)}-{ids}-{report.steps}" if not math.isnan(report.last_loss) else f"simic-{ids}"


def _actions(samples: Sequence[Sample]) -> dict[str, int]:
    names = {0: "germinate", 1: "optimizer", 2: "pause", 3: "breaker_open", 4: "breaker_close"}
    out: dict[str, int] = {}
    for s in samples:
        key = names.get(s.action, "pause")
        out[key] = out.get(key, 0) + 1
    return out


def save_checkpoint(data: bytes, directory: Path) -> Path:
    """Atomically write `data` as `<directory>/<sha256>.pt`; returns the path."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / f"{hashlib.sha256(data).hexdigest()}.pt"
    if not path.exists():
        write_bytes_atomic(path, data)
    return path
