"""Tiny randomly initialised models of every supported MoE family, shared by the test modules."""
from test_adapters import FAMILY_NAMES, SPECS, VOCAB, build, token_ids  # noqa: F401  (single definition lives there for now)
