"""What an exported eacmoe checkpoint runs: packed low-bit modules, the `trust_remote_code` model class, PESF,
and the integrity manifest.

The modules of this directory (plus ``eacmoe/quant/grid.py``, ``eacmoe/quant/packing.py`` and ``eacmoe/pesf.py``)
are copied verbatim into every exported checkpoint (see :mod:`eacmoe.export`), so they import only torch,
transformers, accelerate, safetensors and each other: a checkpoint loads without eacmoe installed, and keeps
running the code it was exported with.
"""
