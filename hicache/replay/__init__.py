"""Trace replay: the main job (``hicache replay``)."""

from hicache.replay.app import ReplaySettings, run_replay
from hicache.replay.cli import add_parser, main

__all__ = ["ReplaySettings", "add_parser", "main", "run_replay"]
