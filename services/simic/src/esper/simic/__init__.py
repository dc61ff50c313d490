"""Simic: learns a better Tamiyo policy from field reports (replay store, offline training with a
validation gate, signed policy updates)."""

from esper.simic.publish import build_update, publish_policy
from esper.simic.replay import MissingIssuedAtError, ReplayStore

__all__ = ["MissingIssuedAtError", "ReplayStore", "build_update", "publish_policy"]
