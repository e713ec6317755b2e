"""The testbed's tasks: deterministic, prompt-disjoint splits whose references the verifiers
accept, and verifiers that reject wrong answers. References are re-derived independently
from the prompt text."""

from __future__ import annotations

import collections
import json
import re

import pytest

from experiments import tasks
from experiments.config import Config

SIZES = {"train": 300, "validation": 40, "test": 60}


def solve_math(prompt: str) -> int:
    total = int(re.search(r"has (\d+)", prompt).group(1))
    for verb, amount in re.findall(r"(buys|gives away) (\d+)", prompt):
        total += int(amount) if verb == "buys" else -int(amount)
    return total


def solve_reasoning(prompt: str) -> str:
    if prompt.startswith("Count the letter"):
        letter, word = re.match(r"Count the letter (\w) in (\w+)\.", prompt).groups()
        return str(sum(ch == letter for ch in word))
    items = prompt.split(":", 1)[1].split()
    if prompt.startswith("Reverse"):
        return " ".join(items[::-1])
    if prompt.startswith("Sort"):
        return " ".join(sorted(items, key=int))
    return items[-1]


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_splits_are_deterministic_disjoint_and_verified(task):
    first = tasks.make_splits(task, SIZES)
    again = tasks.make_splits(task, SIZES)
    assert first == again
    prompts = {split: {e.prompt for e in examples} for split, examples in first.items()}
    assert all(len(prompts[s]) == SIZES[s] for s in SIZES)
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    for example in first["train"] + first["test"]:
        assert tasks.reward(task, example.response, example.response) == 1.0
        assert tasks.reward(task, "I do not know", example.response) == 0.0
        if task == "math":
            assert int(example.response) == solve_math(example.prompt) >= 0
            assert tasks.reward(task, str(int(example.response) + 1), example.response) == 0.0
            assert tasks.reward(task, f"So the answer is {example.response}",
                                example.response) == 1.0
        elif task == "reasoning":
            assert example.response == solve_reasoning(example.prompt)
        else:
            call = json.loads(example.response)
            assert set(call["arguments"]) == set(tasks.TOOLS[call["name"]])
            wrong = dict(call, arguments=dict(call["arguments"]))
            key = next(iter(wrong["arguments"]))
            wrong["arguments"][key] = "x"
            assert tasks.reward(task, json.dumps(wrong), example.response) == 0.0
            assert tasks.reward(task, "Calling: " + json.dumps(call) + " done",
                                example.response) == 1.0


def test_every_kind_of_example_occurs():
    splits = {t: tasks.make_splits(t, {"train": 300})["train"] for t in tasks.TASKS}
    math_steps = {len(re.findall(r"buys|gives away", e.prompt)) for e in splits["math"]}
    assert math_steps == {2, 3}
    assert {json.loads(e.response)["name"] for e in splits["tool"]} == set(tasks.TOOLS)
    starts = {e.prompt.split()[0] for e in splits["reasoning"]}
    assert starts == {"Reverse", "Sort", "Give", "Count"}


def test_every_tool_kind_is_trained_at_the_default_sizes():
    """Test and validation must not use up a kind's prompts: each tool is >= 20% of train."""
    config = Config()
    splits = tasks.make_splits("tool", {"test": config.test_size,
                                        "validation": config.validation_size,
                                        "train": config.tool_train_size})
    assert len(splits["train"]) == config.tool_train_size
    counts = collections.Counter(json.loads(e.response)["name"] for e in splits["train"])
    assert set(counts) == set(tasks.TOOLS)
    assert min(counts.values()) >= 0.2 * config.tool_train_size, counts


def test_write_splits_and_bad_requests(tmp_path):
    paths = tasks.write_splits(tmp_path, "tool", {"train": 5, "test": 3})
    lines = paths["train"].read_text().splitlines()
    assert len(lines) == 5 and set(json.loads(lines[0])) == {"task", "prompt", "response"}
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_splits("poetry", {"train": 1})
    with pytest.raises(ValueError, match="unknown split"):
        tasks.make_splits("math", {"dev": 1})
    with pytest.raises(ValueError, match="cannot supply"):
        tasks.make_splits("tool", {"train": 2000})
