"""The system mode: the highest `EmergencyLevel` signalled within the hold window.

Emergency levels only escalate inside a trainer; fleet-wide the mode steps back down once no
signal at that level arrived for `hold_s`, so an operator sees "ELEVATED a minute ago" decay to
NORMAL (EMERGENCY_LEVEL_UNSPECIFIED) without a restart. A HALT never decays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from esper.leyline import enum_name, pb


@dataclass(slots=True)
class SystemMode:
    hold_s: float
    _last_at: dict[int, float] = field(default_factory=dict)
    signals: int = 0

    def observe(self, level: pb.EmergencyLevel.ValueType, now_s: float) -> None:
        self.signals += 1
        if level != pb.EMERGENCY_LEVEL_UNSPECIFIED:
            self._last_at[int(level)] = now_s

    def level(self, now_s: float) -> pb.EmergencyLevel.ValueType:
        if pb.EMERGENCY_LEVEL_HALT in self._last_at:
            return pb.EMERGENCY_LEVEL_HALT
        live = [lvl for lvl, at in self._last_at.items() if now_s - at < self.hold_s]
        return cast("pb.EmergencyLevel.ValueType", max(live)) if live else pb.EMERGENCY_LEVEL_UNSPECIFIED

    def name(self, now_s: float) -> str:
        level = self.level(now_s)
        if level == pb.EMERGENCY_LEVEL_UNSPECIFIED:
            return "NORMAL"
        return enum_name(pb.EmergencyLevel, level).removeprefix("EMERGENCY_LEVEL_")
