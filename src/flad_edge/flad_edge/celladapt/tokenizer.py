"""A word-level tokenizer for the driving instructions, built offline from the instruction templates.

Why: tests and tiny configs must not download anything, and a tiny randomly-initialised LLaMA needs a
vocabulary that covers LMDrive-style navigation/notice texts. Digits are split one per token so any
distance ("in 37 m") maps to known tokens. Real checkpoints bring their own tokenizer instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flad_sim.instructions import NOTICE_TEXTS, TEMPLATES

PAD, UNK, BOS, EOS, SEP = "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, SEP)


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", text.lower())


def instruction_corpus() -> list[str]:
    """Every instruction template (with a sample distance) and notice text the world can produce."""
    out: list[str] = []
    for with_d, without_d in TEMPLATES.values():
        out += [t.format(d=1234567890) for t in with_d] + list(without_d)
    out += [t for t in NOTICE_TEXTS if t]
    return out


def build_tokenizer(extra_texts: Iterable[str] = ()):
    """A `PreTrainedTokenizerFast` (WordLevel, lower-case, digits split) over the instruction vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for text in [*instruction_corpus(), *extra_texts]:
        for w in _words(text):
            vocab.setdefault(w, len(vocab))
    for d in "0123456789":
        vocab.setdefault(d, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                   eos_token=EOS, sep_token=SEP)
