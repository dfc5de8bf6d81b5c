"""Train the bundled byte-level BPE tokenizer (8192 tokens) on the train split of the bundled corpus.

    python scripts/train_tokenizer.py      # writes eacmoe/assets/tokenizer/
"""
from __future__ import annotations

import argparse
import logging

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from eacmoe.assets import TOKENIZER_DIR
from eacmoe.corpus import iter_documents

EOS = "<|endoftext|>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default: %(default)s)")
    ap.add_argument("--out", default=str(TOKENIZER_DIR), help="output directory (default: %(default)s)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((d["text"] for d in iter_documents("train")), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
                                   model_max_length=2048)
    fast.save_pretrained(args.out)
    logging.info("saved %d-token tokenizer to %s", len(fast), args.out)


if __name__ == "__main__":
    main()
