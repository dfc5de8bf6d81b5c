"""The offline lm-eval suite in eval/: task files load, items are reproducible, and the real CLI runs it.

The CLI test evaluates a tiny randomly initialised Mixtral saved with the bundled tokenizer (``--limit 2``), so
it needs no trained model. WikiText-2 is read from the shared copy; its checks skip only when that file cannot
be found.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_DIR = REPO_ROOT / "eval"
TASKS_DIR = EVAL_DIR / "tasks"
sys.path.insert(0, str(EVAL_DIR))

import build_tasks  # noqa: E402
import run_suite  # noqa: E402

from eacmoe.corpus import wikitext2_dir  # noqa: E402

PPL_TASKS = [f"eacmoe_ppl_{domain}" for domain in ("sotu", "brown", "shakespeare", "pydoc")]
ITEM_TASKS = [*PPL_TASKS, "eacmoe_cloze", "eacmoe_nextsent"]
ALL_TASKS = ["eacmoe_wikitext2", *ITEM_TASKS]
EXPECTED_METRICS = {
    **{task: ("word_perplexity", "byte_perplexity", "bits_per_byte") for task in ["eacmoe_wikitext2", *PPL_TASKS]},
    "eacmoe_cloze": ("acc", "perplexity"),
    "eacmoe_nextsent": ("acc", "acc_norm"),
}
WIKITEXT_MISSING = "WikiText-2 test.txt not found ($EACMOE_WIKITEXT2_DIR or shared/data/wikitext-2 beside the checkout)"


def _load_task_utils():
    spec = importlib.util.spec_from_file_location("eacmoe_eval_task_utils", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Mixtral (4 experts, top-2) saved with the bundled tokenizer."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from eacmoe.assets import TOKENIZER_DIR

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )
    out = tmp_path_factory.mktemp("tiny-mixtral")
    MixtralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cli_results(tiny_model_dir) -> dict:
    """One ``lm_eval`` CLI run (subprocess, offline, float32, --limit 2) of the suite on the tiny model."""
    tasks = "eacmoe_suite" if wikitext2_dir() is not None else "eacmoe_ppl,eacmoe_cloze,eacmoe_nextsent"
    return run_suite.evaluate_model_dir(str(tiny_model_dir), tasks=tasks, limit=2, timeout_s=300)


def test_task_files_load_with_task_manager():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR))
    for name in [*ALL_TASKS, "eacmoe_ppl", "eacmoe_suite"]:
        assert name in manager.all_tasks, name
    stats = json.loads((TASKS_DIR / "data" / "stats.json").read_text())
    loaded = manager.load(ITEM_TASKS)["tasks"]
    for name in ITEM_TASKS:
        task = loaded[name]
        data_file = f"{name.removeprefix('eacmoe_')}.jsonl"
        assert len(task.eval_docs) == stats["files"][data_file]["items"]
        assert set(task._metric_fn_list) == set(EXPECTED_METRICS[name])
    nextsent = loaded["eacmoe_nextsent"]
    doc = nextsent.eval_docs[0]
    assert len(nextsent.doc_to_choice(doc)) == 4 and 0 <= nextsent.doc_to_target(doc) < 4


def test_item_files_are_deterministic(tmp_path):
    build_tasks.build(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "generator wrote nothing"
    for rel in generated:
        assert (TASKS_DIR / rel).read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} differs: rerun build_tasks.py"
    total_bytes = sum((TASKS_DIR / rel).stat().st_size for rel in generated)
    assert total_bytes < 3_000_000


def test_sentence_split_and_chunking_rules():
    assert build_tasks.split_sentences('Mr. Smith left. Then U.S. troops came! "Why?" he asked.') == [
        "Mr. Smith left.", "Then U.S. troops came!", '"Why?" he asked.']
    text = ("word " * 1000).strip() + "\n\n" + ("more " * 300).strip()
    passages = build_tasks.chunk_document(text)
    assert all(len(p) <= build_tasks.PPL_MAX_CHARS for p in passages)
    assert " ".join(passages).split() == text.split()


def test_wikitext2_loader():
    utils = _load_task_utils()
    if wikitext2_dir() is None:
        pytest.skip(WIKITEXT_MISSING)
    pages = utils.load_wikitext2()["test"]
    assert len(pages) == 62  # document-level WikiText-2 test split, as in lm-eval's wikitext task
    assert pages[0]["page"].lstrip().startswith("= ")


def test_wikitext2_missing_file_error(monkeypatch):
    utils = _load_task_utils()
    monkeypatch.setattr(utils, "_wikitext2_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="EACMOE_WIKITEXT2_DIR"):
        utils.load_wikitext2()


def test_unigram_through_lm_eval_metrics():
    """A uniform unigram model has closed-form scores: checks the LM adapter and lm-eval's metric path."""
    from transformers import AutoTokenizer

    from eacmoe.assets import TOKENIZER_DIR
    from unigram_baseline import UnigramLM, run_unigram_suite

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    lm = UnigramLM(tokenizer, np.zeros(len(tokenizer), dtype=np.int64))  # add-one on zeros: uniform
    results = run_unigram_suite(["eacmoe_ppl_sotu", "eacmoe_nextsent"], limit=2, lm=lm)["results"]
    passages = [json.loads(line)["text"] for line in (TASKS_DIR / "data" / "ppl_sotu.jsonl").open()][:2]
    n_tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in passages)
    n_bytes = sum(len(p.encode()) for p in passages)
    expected_bpb = n_tokens * math.log2(len(tokenizer)) / n_bytes
    assert results["eacmoe_ppl_sotu"]["bits_per_byte,none"] == pytest.approx(expected_bpb, rel=1e-9)
    assert 0.0 <= results["eacmoe_nextsent"]["acc,none"] <= 1.0


def test_cli_suite_runs_with_all_metrics(cli_results):
    results = cli_results["results"]
    for task in ITEM_TASKS:
        assert cli_results["n-samples"][task]["effective"] == 2
        for metric in EXPECTED_METRICS[task]:
            value = results[task][f"{metric},none"]
            assert math.isfinite(value), (task, metric, value)
    row = run_suite.table_row("tiny", run_suite.summarize(cli_results))
    assert row.count("|") == run_suite.TABLE_HEADER.splitlines()[0].count("|")


def test_cli_wikitext2(cli_results):
    if wikitext2_dir() is None:
        pytest.skip(WIKITEXT_MISSING)
    task = cli_results["results"]["eacmoe_wikitext2"]
    assert cli_results["n-samples"]["eacmoe_wikitext2"] == {"original": 62, "effective": 2}
    for metric in EXPECTED_METRICS["eacmoe_wikitext2"]:
        assert math.isfinite(task[f"{metric},none"])


def test_run_suite_refuses_quantized_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="quantized"):
        run_suite.evaluate_model_dir(str(tmp_path), limit=2)


@pytest.mark.parametrize("config, trusted", [
    ({"model_type": "mixtral", "eacmoe": {"format": "packed", "version": 1}}, True),  # a packed export
    ({"model_type": "eacmoe"}, True),  # a packed export made before the eacmoe marker
    ({"model_type": "mixtral"}, False),
], ids=["packed", "pre-marker", "plain"])
def test_lm_eval_command_trusts_remote_code_for_packed_exports_only(tmp_path, config, trusted):
    (tmp_path / "config.json").write_text(json.dumps(config))
    command = run_suite.lm_eval_command(str(tmp_path))
    model_args = command[command.index("--model_args") + 1].split(",")
    assert ("trust_remote_code=True" in model_args) == trusted
    assert ("experts_implementation=eager" in model_args) != trusted


@pytest.mark.integration
def test_lm_eval_cli_on_packed_export_equals_in_memory(tmp_path):
    """The real lm_eval CLI on an exported bundled model reproduces simple_evaluate on the in-memory model."""
    import torch

    from eacmoe.calibration import get_calibration_data
    from eacmoe.export import export_model, in_memory_layers, non_layer_state
    from eacmoe.pipeline import LayerwiseQuantizer, QuantizeConfig
    from eacmoe.workflow import load_model

    model, tokenizer = load_model("tiny-mixtral", torch.float32)
    config = QuantizeConfig(expert_bits=[2] * 8, method="gptq", attn_bits=4)
    quantizer = LayerwiseQuantizer(model, config)
    quantizer.run(get_calibration_data("bundled", tokenizer, 8, 128, seed=0))
    tasks = ["eacmoe_cloze", "eacmoe_nextsent", "eacmoe_ppl_brown"]
    in_memory = run_suite.summarize(run_suite.evaluate_model_object(model, tokenizer, tasks, limit=8))

    out = tmp_path / "packed"
    out.mkdir()
    export_model(out, "packed", model, in_memory_layers(model, quantizer.quantized),
                 non_layer_state(model), tokenizer, {"method": "gptq"}, torch.bfloat16)
    via_cli = run_suite.summarize(run_suite.evaluate_model_dir(str(out), ",".join(tasks), limit=8))
    assert in_memory.keys() == via_cli.keys() and "brown_word_ppl" in via_cli
    for key, value in in_memory.items():
        assert via_cli[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
