"""eacmoe: expert-aware compression of Mixture-of-Experts language models (EAC-MoE: QESC + PESF)."""

__version__ = "0.1.0"
