"""Import GPTQModel inside tests without leaking its import-time side effects into the pytest session.

Importing gptqmodel (via tokenicer/logbar) sets HF_HOME/HF_HUB_CACHE/TRANSFORMERS_CACHE to /tmp paths,
CUDA/allocator variables, and calls logging.basicConfig(level=INFO). Other tests in the same session must not
see that, so :func:`gptqmodel_import_guard` restores the environment and the root logger when it exits;
huggingface_hub and transformers are imported first so their cache constants come from the real environment.

    with gptqmodel_import_guard():
        pytest.importorskip("gptqmodel")
        from gptqmodel.quantization.gptq import GPTQ
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gptqmodel_import_guard() -> Iterator[None]:
    """Restore ``os.environ`` and the root logger's handlers/level after the ``with`` body (imports go there)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # kept: 2 cores on this machine
    import huggingface_hub  # noqa: F401
    import transformers  # noqa: F401

    env = dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        root.handlers[:] = handlers
        root.setLevel(level)


def leaked_hf_cache_vars() -> list[str]:
    """Names of HF cache variables that still point at tokenicer's /tmp home (empty when nothing leaked)."""
    return [
        key
        for key in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE")
        if os.environ.get(key, "").startswith("/tmp/tokenicer_hf_home")
    ]
