"""The tasks' splits, written as JSONL and tokenised into fixed-shape arrays per task.

Splits come from :func:`experiments.tasks.make_splits` (deterministic, prompt-disjoint: test,
then validation, then train). Each task gets one padded length (longest prompt + response of
any split, rounded up to 8), one prompt length and one decoding budget (longest reference
response + ``extra_new_tokens``), so training and evaluation compile once per task.
"""

from __future__ import annotations

import dataclasses
import pathlib

from experiments import common, tasks
from experiments.config import Config
from jaxmerge.fisher import data as data_lib


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task's examples and their encodings.

    Attributes:
      name: the task.
      splits: split -> examples.
      encoded: split -> :class:`experiments.common.Encoded`.
      max_new_tokens: the decoding budget of an answer (EOS included).
      paths: split -> the JSONL file (``{"task", "prompt", "response"}`` lines).
    """

    name: str
    splits: dict[str, list[tasks.Example]]
    encoded: dict[str, common.Encoded]
    max_new_tokens: int
    paths: dict[str, pathlib.Path]

    def references(self, split: str) -> list[str]:
        return [example.response for example in self.splits[split]]


def sizes(config: Config, task: str) -> dict[str, int]:
    train = config.tool_train_size if task == "tool" else config.train_size
    return {"train": train, "validation": config.validation_size, "test": config.test_size}


def _round_up(value: int, multiple: int = 8) -> int:
    return -(-value // multiple) * multiple


def _shapes(tokenized) -> tuple[int, int, int]:
    """(padded length, prompt length, longest response) of tokenised examples."""
    return (_round_up(max(len(example.input_ids) for example in tokenized)),
            max(example.first_target for example in tokenized),
            max(len(example.input_ids) - example.first_target for example in tokenized))


def prepare(config: Config, tokenizer, out_dir) -> dict[str, TaskData]:
    """Writes ``{out_dir}/{task}/{split}.jsonl`` and tokenises every split of every task.

    With ``config.shared_shapes`` every task gets the largest task's shapes (fewer programs to
    compile, more padding: for the seconds-scale test run).
    """
    splits, pairs, shapes, paths = {}, {}, {}, {}
    for task in tasks.TASKS:
        paths[task] = tasks.write_splits(out_dir, task, sizes(config, task))
        splits[task] = tasks.make_splits(task, sizes(config, task))
        pairs[task] = {split: [(e.prompt, e.response) for e in examples]
                       for split, examples in splits[task].items()}
        examples = [data_lib.Example(p, r) for split in pairs[task].values() for p, r in split]
        shapes[task] = _shapes(data_lib.tokenize(examples, tokenizer, max_length=None,
                                                 chat_template=config.chat_template))
    if config.shared_shapes:
        largest = tuple(max(values) for values in zip(*shapes.values(), strict=True))
        shapes = dict.fromkeys(shapes, largest)
    prepared = {}
    for task, (length, prompt_length, response) in shapes.items():
        encoded = {split: common.encode(tokenizer, split_pairs, length, prompt_length,
                                        config.chat_template)
                   for split, split_pairs in pairs[task].items()}
        prepared[task] = TaskData(task, splits[task], encoded,
                                  response + config.extra_new_tokens, paths[task])
    return prepared
