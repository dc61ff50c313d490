"""No settings object reads a generic environment variable named like one of its fields.

A bare alias (`EPOCHS`, `DEVICE`, `GROUP`, `VAR_DIR`) would let any unrelated variable in a user's
shell or a container silently reconfigure a service; every knob is read from its prefixed name only
(`TOLARIA_EPOCHS`, ...), or from a documented prototype name.
"""

from __future__ import annotations

import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from esper.kasmina.settings import KasminaSettings
from esper.nissa.settings import NissaSettings
from esper.simic.settings import SimicSettings
from esper.tamiyo.settings import TamiyoSettings
from esper.tezzeret.settings import TezzeretSettings
from esper.tolaria.settings import TolariaSettings
from esper.urabrask.settings import UrabraskSettings
from esper.urza.settings import UrzaSettings
from esper.weatherlight.settings import WeatherlightSettings

# OonaSettings (and EsperSettings) read ESPER_-prefixed names only: no aliases to leak.
CLASSES: list[type[BaseSettings]] = [KasminaSettings, NissaSettings, SimicSettings, TamiyoSettings,
                                     TezzeretSettings, TolariaSettings, UrabraskSettings, UrzaSettings,
                                     WeatherlightSettings]


def _aliases(field: object) -> set[str]:
    alias = getattr(field, "validation_alias", None)
    if isinstance(alias, str):
        return {alias.upper()}
    if isinstance(alias, AliasChoices):
        return {str(a).upper() for a in alias.choices}
    return set()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_bare_field_names_in_the_environment_change_nothing(cls: type[BaseSettings],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    probed = []
    for name, field in cls.model_fields.items():
        if not _aliases(field) or name.upper() in _aliases(field):
            continue  # ESPER_-prefixed field, or a documented prototype name
        monkeypatch.setenv(name.upper(), "leak")
        monkeypatch.setenv(name, "leak")
        probed.append(name)
    assert probed, f"{cls.__name__}: no aliased field to probe"
    settings = cls(_env_file=None)  # type: ignore[call-arg]
    defaults = cls.model_construct()
    fresh = {n for n, f in cls.model_fields.items() if f.default_factory is not None}  # e.g. a random run id
    leaked = [n for n in probed if (getattr(settings, n) != getattr(defaults, n) and n not in fresh)
              or "leak" in str(getattr(settings, n))]
    assert not leaked, f"{cls.__name__} read bare env vars: {leaked}"
