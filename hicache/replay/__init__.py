"""Trace replay: the main job (``hicache replay``)."""

from hicache.replay.app import ReplaySettings, add_parser, main, run_replay

__all__ = ["ReplaySettings", "add_parser", "main", "run_replay"]
