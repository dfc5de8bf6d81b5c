"""Tiny randomly initialised models of every supported MoE family, shared by the test modules."""
from test_adapters import FAMILY_NAMES, SPECS, VOCAB, build, token_ids  # noqa: F401  (single definition lives there for now)


def mixtral_with_bundled_tokenizer(seed: int = 0):
    """A tiny random Mixtral whose vocabulary is the bundled tokenizer's, and that tokenizer: what a directory
    for the command-line tools needs (`save_pretrained` both)."""
    return family_with_bundled_tokenizer("mixtral", seed)


def family_with_bundled_tokenizer(family: str, seed: int = 0):
    """A tiny random model of `family` (a key of SPECS) with the bundled tokenizer's vocabulary, and that tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eacmoe.assets import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = SPECS[family].make_config()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config), tokenizer
