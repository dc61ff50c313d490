"""Urza's one typed settings object: the bus settings (`ESPER_*`) plus Urza's knobs, which keep the
prototype's names (`URZA_DATABASE_URL`, `URZA_ARTIFACT_DIR`, `KERNEL_FRESHNESS_WINDOW_MS`,
`KERNEL_NONCE_CACHE_SIZE`; REFERENCE_PROTOTYPE §5)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from esper.core.errors import ConfigurationError
from esper.karn.template import KarnError, SlotShape
from esper.oona.settings import OonaSettings

__all__ = ["UrzaSettings", "sqlite_path"]

SQLITE_PREFIX = "sqlite:///"


def _u(name: str, *prototype: str) -> AliasChoices:
    """Accept URZA_<NAME>, the prototype's own name(s), and the field name in code."""
    return AliasChoices(f"URZA_{name.upper()}", *prototype)


def sqlite_path(url: str) -> Path:
    """`sqlite:///./var/urza/catalog.db` → `./var/urza/catalog.db`; `sqlite:////abs/x.db` → `/abs/x.db`."""
    if not url.startswith(SQLITE_PREFIX) or len(url) == len(SQLITE_PREFIX):
        raise ConfigurationError(f"URZA_DATABASE_URL must be sqlite:///<path>, got {url!r}")
    return Path(url.removeprefix(SQLITE_PREFIX))


class UrzaSettings(OonaSettings):
    model_config = SettingsConfigDict(env_prefix="ESPER_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", populate_by_name=True)

    service_name: str = "urza"
    group: str = Field("urza", validation_alias=_u("group"),
                       description="consumer group on kernel.request, blueprint.query and bsds")
    consumer_name: str | None = Field(None, validation_alias=_u("consumer_name"),
                                      description="consumer name in the group; default urza-<instance_id>")
    database_url: str = Field("sqlite:///./var/urza/catalog.db", validation_alias=_u("database_url"),
                              description="the SQLite catalogue (sqlite:///<path>)")
    artifact_dir: Path = Field(Path("./var/urza/artifacts"), validation_alias=_u("artifact_dir"),
                               description="content-addressed artifact files (shared with Tezzeret and Kasmina)")
    kernel_freshness_window_ms: int = Field(
        60_000, gt=0, validation_alias=_u("kernel_freshness_window_ms", "KERNEL_FRESHNESS_WINDOW_MS"),
        description="kernel requests whose issued_at is further than this from now (either way) are dropped")
    kernel_nonce_cache_size: int = Field(
        4096, gt=0, validation_alias=_u("kernel_nonce_cache_size", "KERNEL_NONCE_CACHE_SIZE"),
        description="kernel request ids remembered for replay detection")
    seed_karn: bool = Field(True, validation_alias=_u("seed_karn"),
                            description="register every Karn template's descriptor on start")
    seed_slot: str | None = Field("v64", validation_alias=_u("seed_slot"),
                                  description="slot key (v64, c16x8x8) whose graphs are stored when seeding")
    busy_timeout_ms: int = Field(10_000, gt=0, validation_alias=_u("busy_timeout_ms"),
                                 description="SQLite busy timeout (other processes writing the catalogue)")

    @field_validator("database_url")
    @classmethod
    def _sqlite_only(cls, value: str) -> str:
        sqlite_path(value)
        return value

    @field_validator("seed_slot")
    @classmethod
    def _slot_key(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            return SlotShape.from_key(value).as_key()
        except KarnError as e:
            raise ConfigurationError(f"URZA_SEED_SLOT: {e}") from e

    @property
    def db_path(self) -> Path:
        return sqlite_path(self.database_url)
