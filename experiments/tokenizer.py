"""The tiny base's tokenizer: the tasks' fixed words as whole tokens, everything else by character.

Built offline with the ``tokenizers`` library and saved as a ``PreTrainedTokenizerFast``, so
``transformers.AutoTokenizer`` (and therefore :mod:`jaxmerge.fisher` and
:mod:`jaxmerge.evaluate`) loads it from the checkpoint directory.

- Pre-tokenisation: a regex emits a known template word with its optional leading space
  (``" has"``, ``"get_weather"``), an *entity* (a name, city or unit, which answers copy from
  prompts) without one, so the copy is the same token, or one character. Known words are the
  alphabetic words of the task templates and their constant pools; digits, spaces, punctuation
  and the random letter strings of the ``reasoning`` task's counting questions stay single
  characters, so arithmetic, copying and counting work digit by digit and letter by letter
  (whole-number tokens were tried: copying 90 number tokens is learned more slowly than
  copying 10 digits, and arithmetic barely gained).
- Vocabulary: ``<pad>`` 0, ``<s>`` 1 (BOS), ``</s>`` 2 (EOS), ``<sep>`` 3, ``<unk>`` 4, the
  printable ASCII characters, the known words, then the template words with a leading space.
- Prompt format (no chat template): ``tokenizer(prompt)`` is ``<s> prompt <sep>``; a response
  is tokenised without special tokens and ends with ``</s>``. This is exactly how
  :func:`jaxmerge.fisher.data.tokenize_example` builds (prompt, response) pairs, so Fisher
  estimation and evaluation see the format the experts were trained on.
- Decoding concatenates the tokens (``decoders.Fuse``): ``decode(encode(text)) == text``.
"""

from __future__ import annotations

import re
import string

from experiments import tasks

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<sep>", "<unk>")
PAD, BOS, EOS, SEP, UNK = range(len(SPECIAL_TOKENS))
CHARACTERS = "".join(c for c in string.printable if c not in "\t\n\r\x0b\x0c")

_SAMPLES_PER_TASK = 400


def known_words() -> list[str]:
    """The tasks' fixed alphabetic words (≥ 2 letters), sorted.

    Harvested from examples of every task, minus the ``reasoning`` task's random letter strings
    (words made only of :data:`experiments.tasks.LETTERS`); checked to be closed: the same
    harvest from another seed finds no new word.
    """
    def harvest(seed: int) -> set[str]:
        import numpy as np

        rng = np.random.default_rng(seed)
        words: set[str] = set()
        for task in tasks.TASKS.values():
            for _ in range(_SAMPLES_PER_TASK):
                prompt, response = task.make(rng)
                words |= set(re.findall(r"[A-Za-z_]+", prompt + " " + response))
        return {w for w in words if len(w) > 1 and not set(w) <= set(tasks.LETTERS)}

    words = harvest(0)
    missing = harvest(1) - words
    if missing:
        raise AssertionError(f"known_words is not closed: {sorted(missing)}")
    return sorted(words)


def entities() -> list[str]:
    """Words an answer copies from its prompt: names, cities, days, units (never space-prefixed)."""
    return sorted({*tasks.NAMES, *tasks.CITIES, *tasks.DAYS, "celsius", "fahrenheit"})


def vocabulary() -> dict[str, int]:
    """token -> id (see the module docstring for the layout)."""
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    words = known_words()
    tokens += words + [" " + word for word in words if word not in entities()]
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer(out_dir=None):
    """The tokenizer as a ``transformers.PreTrainedTokenizerFast`` (saved to ``out_dir``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    def alternation(words):  # longest first
        return "|".join(map(re.escape, sorted(words, key=len, reverse=True)))

    template = [word for word in known_words() if word not in entities()]
    pattern = (r" ?\b(?:" + alternation(template) + r")\b|\b(?:" + alternation(entities())
               + r")\b|.")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A <sep>", special_tokens=[("<s>", BOS), ("<sep>", SEP)])
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", sep_token="<sep>", clean_up_tokenization_spaces=False,
        padding_side="left")
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
