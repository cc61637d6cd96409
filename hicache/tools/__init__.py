"""Operator tools and benchmarks (``hicache bench ...``); never imported on the serving path."""
