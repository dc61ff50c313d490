"""Simic: learns a better Tamiyo policy from field reports. So far: the replay store that keeps them."""

from esper.simic.replay import MissingIssuedAtError, ReplayStore

__all__ = ["MissingIssuedAtError", "ReplayStore"]
