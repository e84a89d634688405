"""Speculative decoding: proposers, verification and the scheduler's bookkeeping (docs/SPEC_DECODE.md)."""
