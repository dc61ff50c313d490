"""The `SystemStatePacket` of one step (ARCHITECTURE §5 step 1). Pure: the trainer passes numbers in."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from esper.leyline import pb


def build_packet(*, run_id: str, step: int, epoch: int, epochs_total: int, steps_total: int, training_loss: float,
                 validation_loss: float | None, validation_accuracy: float | None,
                 training_metrics: Mapping[str, float], seed_states: Sequence[pb.SeedState]) -> pb.SystemStatePacket:
    """`packet_id` is `<run>-<step>`: unique per run, and what Tamiyo's failures echo back. The run's
    planned length rides in `training_metrics` (`epochs_total`, `steps_total`): Tamiyo grows no seed
    the run cannot finish."""
    packet = pb.SystemStatePacket(
        version=1, current_epoch=epoch, timestamp_ns=time.time_ns(), packet_id=f"{run_id}-{step}",
        global_step=step, training_loss=training_loss, source_subsystem="tolaria", training_run_id=run_id,
        seed_states=list(seed_states),
    )
    if validation_loss is not None:
        packet.validation_loss = validation_loss
    if validation_accuracy is not None:
        packet.validation_accuracy = validation_accuracy
    packet.training_metrics.update(training_metrics)
    packet.training_metrics["epochs_total"] = float(epochs_total)
    packet.training_metrics["steps_total"] = float(steps_total)
    return packet
