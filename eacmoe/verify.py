"""Check that a model, however it was loaded, holds only tensors read from its export directory.

A loader that does not know a checkpoint's format may build the architecture and fill in whatever it did not
find with random values (transformers logs such tensors as MISSING and carries on). eacmoe's runtime and
GPTQModel load every tensor by its stored name; for any other loader, one line after loading:

    from eacmoe.verify import check_loaded; check_loaded(model, DIR)

Names are compared, not values: a loader may repack what it read (GPTQModel turns v1 zero points into v2).
"""
from __future__ import annotations

import logging
from pathlib import Path

from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)


def tensors_not_in_checkpoint(model: nn.Module, directory: str | Path) -> list[str]:
    """Names in ``model.state_dict()`` that no ``*.safetensors`` file of ``directory`` holds, tied copies of a
    stored tensor (e.g. an LM head sharing the embeddings) excepted: what the loader made up."""
    stored: set[str] = set()
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            stored.update(f.keys())
    state = model.state_dict()
    stored_memory = {(t.data_ptr(), t.shape) for k, t in state.items() if k in stored and not t.is_meta}
    return sorted(k for k, t in state.items()
                  if k not in stored and (t.is_meta or (t.data_ptr(), t.shape) not in stored_memory))


def check_loaded(model: nn.Module, directory: str | Path) -> None:
    """Raise ValueError when ``model`` has tensors that its checkpoint ``directory`` does not hold."""
    made_up = tensors_not_in_checkpoint(model, directory)
    if made_up:
        raise ValueError(f"{len(made_up)} tensors of the loaded model are not in the weight files of {directory}: "
                         f"the loader initialised them itself (e.g. randomly): {', '.join(made_up[:6])}"
                         + (", ..." if len(made_up) > 6 else ""))
    log.info("every tensor of the loaded model comes from %s", directory)
