"""The bundled trained models load with plain transformers, generate, and are real (not random) models."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eacmoe.adapters import get_adapter
from eacmoe.assets import BUNDLED_MODELS, bundled_model_path
from eacmoe.heldout import heldout_sequences


@pytest.mark.integration
@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_model_loads_generates_and_beats_chance(name: str) -> None:
    path = bundled_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    adapter = get_adapter(model)
    assert len(adapter.decoder_layers(model)) >= 8
    assert sum(p.numel() for p in model.parameters()) <= 20.5e6
    assert sum(f.stat().st_size for f in path.glob("*.safetensors")) <= 40e6
    prompt = tokenizer("The President said that", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 12
    # held-out perplexity far below the 8192-token uniform guess: the weights are trained, not random
    ids = heldout_sequences("bundled-test", tokenizer, 2, 256)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 1000
    log = json.loads((path / "training_log.json").read_text())
    assert log["tokens_seen"] > 1e6
