"""Shared pieces for the Kasmina tests: signed commands, a tiny host, a training step, and a kernel
source that builds real Karn kernels through the real artifact path (pack → verify → rebuild) without
the bus. The bus path itself (KernelClient against a running Urza) is tested in test_kernels.py and
test_end_to_end.py."""

from __future__ import annotations

import base64
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esper.karn import SlotShape, get_template
from esper.kasmina import FetchedKernel, Kasmina, KasminaSettings, KernelFetchError, SeedSlot
from esper.kasmina.kernels import resolve_kernel_id
from esper.leyline import SigningKeys, hmac_sha256, pb, sign_command
from esper.leyline.signing import COMMAND_KEY_ID, COMMAND_SIGNATURE
from esper.urza.artifact import checksum, load_artifact, pack_artifact, rebuild

KEYS = SigningKeys("k1", b"kasmina-test-secret-0123456789")
OTHER_KEYS = SigningKeys("k2", b"another-secret-abcdefghijklmnop")
NOW_MS = 1_750_000_000_000
SEED = "seed-hidden"
WIDTH = 8


def clock() -> int:
    return NOW_MS


_counter = iter(range(1, 1_000_000))


def command(kind: int = pb.COMMAND_SEED, *, seed_id: str = SEED, op: int = pb.SEED_OP_GERMINATE,
            blueprint: str = "BP002", params: Mapping[str, float] | None = None,
            annotations: Mapping[str, str] | None = None, issued_at_ms: int | None = NOW_MS,
            command_id: str | None = None, keys: SigningKeys | None = KEYS) -> pb.AdaptationCommand:
    """A command as Tamiyo sends it: ids, timestamp, payload, annotations, then the signature."""
    cmd = pb.AdaptationCommand(version=1, command_type=kind, target_seed_id=seed_id, issued_by="tamiyo:test",
                               command_id=f"cmd-{next(_counter)}" if command_id is None else command_id)
    if issued_at_ms is not None:
        cmd.issued_at.FromMilliseconds(issued_at_ms)
    if kind == pb.COMMAND_SEED:
        cmd.seed_operation.operation = op  # type: ignore[assignment]
        cmd.seed_operation.blueprint_id = blueprint
        cmd.seed_operation.parameters.update(params if params is not None else
                                             {"alpha": 0.1, "blending_schedule_start": 0.0,
                                              "blending_schedule_end": 1.0, "blending_method_index": 0.0})
    elif kind == pb.COMMAND_OPTIMIZER:
        cmd.optimizer_adjustment.optimizer_id = "sgd"
        cmd.optimizer_adjustment.hyperparameters["lr_delta"] = 0.01
    cmd.annotations.update(annotations or {})
    if keys is not None:
        sign_command(cmd, keys)
    return cmd


def sign_raw(cmd: pb.AdaptationCommand, keys: SigningKeys) -> pb.AdaptationCommand:
    """A valid signature even where ``sign_command`` refuses (no command_id)."""
    cmd.annotations[COMMAND_KEY_ID] = keys.key_id
    copy = pb.AdaptationCommand()
    copy.CopyFrom(cmd)
    copy.annotations.pop(COMMAND_SIGNATURE, None)
    mac = hmac_sha256(keys.secret, copy.SerializeToString(deterministic=True))
    cmd.annotations[COMMAND_SIGNATURE] = base64.b64encode(mac).decode("ascii")
    return cmd


class TinyHost(nn.Module):
    """4 → 8 → slot → 3: the smallest host with a seed slot."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, width)
        self.act = nn.Tanh()
        self.slot = SeedSlot("hidden", SlotShape(width))
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.slot(self.act(self.fc1(x))))
        return out


def data(n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def train_step(model: nn.Module, kasmina: Kasmina, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor],
               step: int, *, aux: bool = True, report_loss: bool = True) -> float:
    """One trainer step as docs/kasmina.md prescribes."""
    x, y = batch
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    total = loss
    extra = kasmina.auxiliary_loss()
    if aux and extra is not None:
        total = loss + extra
    total.backward()
    opt.step()
    kasmina.advance(step, loss=loss.item() if report_loss else None)
    return loss.item()


def fast_settings(**overrides: object) -> KasminaSettings:
    base: dict[str, object] = {"training_steps": 3, "blend_steps": 4, "shadow_steps": 2, "probation_steps": 2,
                               "embargo_steps": 1, "evidence_grace_steps": 3, "regression_tolerance": 0.5,
                               "latency_budget_ms": 1e6}
    base.update(overrides)
    return KasminaSettings(**base)  # type: ignore[arg-type]


class KarnKernelSource:
    """Real Karn kernels through the artifact format (pack → sha256 → weights-only load → rebuild)."""

    def __init__(self, *, fail: str | None = None) -> None:
        self.fail = fail
        self.fetches = 0

    async def fetch(self, blueprint_id: str, slot: SlotShape, *, device: torch.device) -> FetchedKernel:
        self.fetches += 1
        kid = resolve_kernel_id(blueprint_id, slot)
        if self.fail is not None:
            raise KernelFetchError(self.fail, "configured to fail", kernel_id=kid)
        bp = kid.split("@", 1)[0]
        template = get_template(bp)
        params = template.resolve_params()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            module = template.build(slot, params)
        raw = pack_artifact(bp, slot, params, module.state_dict())
        artifact = load_artifact(raw, checksum(raw))
        return FetchedKernel(module=rebuild(artifact, device), blueprint_id=bp, kernel_id=kid,
                             checksum=artifact.checksum, guard_digest=artifact.guard_digest, params=params,
                             latency_ms=0.0, cache_hit=False)


def events(kasmina: Kasmina, name: str | None = None) -> list[dict[str, str]]:
    """Drained events as attribute dicts (optionally only one name)."""
    out = [dict(e.attributes) | {"_level": str(e.level)} for e in kasmina.drain_events()]
    return [e for e in out if name is None or e["event"] == name]


def first_param_grad(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


__all__ = [
    "KEYS",
    "NOW_MS",
    "OTHER_KEYS",
    "SEED",
    "WIDTH",
    "KarnKernelSource",
    "TinyHost",
    "clock",
    "command",
    "data",
    "events",
    "fast_settings",
    "first_param_grad",
    "sign_raw",
    "train_step",
]
