"""Mixture of experts: the one MoE config parser (engine and planner), routing with capacity,
expert-parallel dispatch, per-expert statistics and sparse upcycling (docs/MOE.md)."""
