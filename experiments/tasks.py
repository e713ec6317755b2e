"""Tasks with verifiable rewards for the RL-vs-SFT testbed, generated offline and deterministically.

Three domains, one task each, small enough for a tiny model to learn on a CPU:

- ``math``: multi-step arithmetic word problems ("Ana has 7 pens. She buys 5 more and gives away
  3. How many pens does Ana have now?"); the reward parses the last integer of the answer.
- ``tool``: function calling; the prompt asks for an action, the answer is one JSON call
  ``{"name": ..., "arguments": {...}}``; the reward parses the first JSON object of the answer
  and compares the name and every argument.
- ``reasoning``: string and list manipulation (reverse, sort, count, first/last); the reward
  is an exact match after whitespace normalisation.

Every example is a pure function of (task, split, index): ``examples(task, split, count)``
draws from a ``numpy`` generator seeded by a stable hash of the three, and the splits are
disjoint by prompt (a validation or test prompt never appears in train).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import zlib
from collections.abc import Callable

import numpy as np

SPLITS = ("train", "validation", "test")

NAMES = ("Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Ivy")
OBJECTS = ("pens", "apples", "books", "coins", "cards", "shells")
CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Rome", "Delhi", "Seoul",
          "Berlin", "Madrid", "Dublin", "Nairobi", "Sydney", "Toronto", "Vienna")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TIMER_SECONDS = (0, 15, 30, 45)
LETTERS = "abcdefghij"


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt and its reference answer."""

    task: str
    prompt: str
    response: str

    def to_json(self) -> str:
        return json.dumps({"task": self.task, "prompt": self.prompt, "response": self.response})


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: a generator of (prompt, reference) and a verifier ``reward(answer, reference)``."""

    name: str
    domain: str
    make: Callable[[np.random.Generator], tuple[str, str]]
    reward: Callable[[str, str], float]


# ---------------------------------------------------------------------------
# math


def make_arithmetic(rng: np.random.Generator) -> tuple[str, str]:
    """2–3 step word problem over small integers; the answer is never negative."""
    name = NAMES[rng.integers(len(NAMES))]
    thing = OBJECTS[rng.integers(len(OBJECTS))]
    total = int(rng.integers(2, 10))
    sentences = [f"{name} has {total} {thing}."]
    for _ in range(int(rng.integers(2, 4))):
        if total > 1 and rng.random() < 0.5:
            amount = int(rng.integers(1, total))
            sentences.append(f"{name} gives away {amount}.")
            total -= amount
        else:
            amount = int(rng.integers(1, 10))
            sentences.append(f"{name} buys {amount} more.")
            total += amount
    sentences.append(f"How many {thing} does {name} have now?")
    return " ".join(sentences), str(total)


def last_integer(text: str) -> int | None:
    found = re.findall(r"-?\d+", text)
    return int(found[-1]) if found else None


def arithmetic_reward(answer: str, reference: str) -> float:
    """1 if the last integer in the answer equals the reference, else 0."""
    return float(last_integer(answer) == int(reference))


# ---------------------------------------------------------------------------
# tool use

TOOLS = {
    "get_weather": ("city", "day", "unit"),
    "set_timer": ("minutes", "seconds"),
    "send_money": ("to", "amount"),
}


def make_tool_call(rng: np.random.Generator) -> tuple[str, str]:
    """A request and the one JSON call that serves it.

    The three kinds are equally likely, and each has a few hundred distinct prompts
    (weather 16 cities x 7 days x 2 units = 224, timer 59 x 4 = 236, money 8 x 99 = 792),
    so the test and validation splits (~100 of each kind at the default sizes) leave every
    kind in the training split.
    """
    kind = int(rng.integers(3))
    if kind == 0:
        city, day = CITIES[rng.integers(len(CITIES))], DAYS[rng.integers(len(DAYS))]
        unit = ("celsius", "fahrenheit")[rng.integers(2)]
        prompt = f"What is the weather in {city} on {day} in {unit}?"
        call = {"name": "get_weather", "arguments": {"city": city, "day": day, "unit": unit}}
    elif kind == 1:
        minutes = int(rng.integers(1, 60))
        seconds = TIMER_SECONDS[rng.integers(len(TIMER_SECONDS))]
        prompt = f"Set a timer for {minutes} minutes and {seconds} seconds."
        call = {"name": "set_timer", "arguments": {"minutes": minutes, "seconds": seconds}}
    else:
        name, amount = NAMES[rng.integers(len(NAMES))], int(rng.integers(1, 100))
        prompt = f"Send {amount} dollars to {name}."
        call = {"name": "send_money", "arguments": {"to": name, "amount": amount}}
    return prompt, json.dumps(call, separators=(",", ":"))


def first_json_object(text: str) -> dict | None:
    """The first parseable ``{...}`` object in ``text`` (None if there is none)."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def tool_reward(answer: str, reference: str) -> float:
    """1 if the first JSON object of the answer is the reference call (name and arguments)."""
    call = first_json_object(answer)
    return float(call is not None and call == json.loads(reference))


# ---------------------------------------------------------------------------
# reasoning


def make_list_manipulation(rng: np.random.Generator) -> tuple[str, str]:
    """Reverse / sort a short list of digits, count a letter, or take the first / last item."""
    kind = int(rng.integers(4))
    if kind == 3:
        word = "".join(LETTERS[i] for i in rng.integers(0, 4, size=int(rng.integers(3, 8))))
        letter = word[rng.integers(len(word))]
        return f"Count the letter {letter} in {word}.", str(word.count(letter))
    items = [str(int(d)) for d in rng.integers(0, 10, size=int(rng.integers(3, 7)))]
    shown = " ".join(items)
    if kind == 0:
        return f"Reverse the list: {shown}", " ".join(reversed(items))
    if kind == 1:
        return f"Sort the list: {shown}", " ".join(sorted(items))
    return f"Give the last item of: {shown}", items[-1]


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_reward(answer: str, reference: str) -> float:
    """1 if the answer equals the reference after whitespace normalisation."""
    return float(normalise(answer) == normalise(reference))


TASKS = {
    "math": Task("math", "math", make_arithmetic, arithmetic_reward),
    "tool": Task("tool", "tool use", make_tool_call, tool_reward),
    "reasoning": Task("reasoning", "reasoning", make_list_manipulation, exact_reward),
}


# ---------------------------------------------------------------------------
# splits


MAX_MISSES = 2000
"""Consecutive repeated prompts after which a task counts as exhausted."""


def _seed(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def _draw(task: Task, split: str, count: int, exclude: set[str]) -> list[Example]:
    rng = np.random.default_rng(_seed(task.name, split))
    examples, seen = [], set(exclude)
    misses = 0  # consecutive draws of an already used prompt
    while len(examples) < count:
        prompt, response = task.make(rng)
        if prompt in seen:
            misses += 1
            if misses > MAX_MISSES:
                raise ValueError(f"task {task.name!r} cannot supply {count} distinct {split} "
                                 f"prompts (found {len(examples)})")
            continue
        misses = 0
        seen.add(prompt)
        examples.append(Example(task.name, prompt, response))
    return examples


def make_splits(task: str, sizes: dict[str, int]) -> dict[str, list[Example]]:
    """Deterministic, prompt-disjoint splits: test first, then validation, then train."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    splits: dict[str, list[Example]] = {}
    used: set[str] = set()
    for split in ("test", "validation", "train"):
        if split in sizes:
            splits[split] = _draw(TASKS[task], split, sizes[split], used)
            used |= {e.prompt for e in splits[split]}
    return splits


def write_splits(out_dir, task: str, sizes: dict[str, int]) -> dict[str, pathlib.Path]:
    """Writes ``{out_dir}/{task}/{split}.jsonl`` ({"task", "prompt", "response"} per line)."""
    paths = {}
    directory = pathlib.Path(out_dir) / task
    directory.mkdir(parents=True, exist_ok=True)
    for split, examples in make_splits(task, sizes).items():
        path = directory / f"{split}.jsonl"
        path.write_text("".join(e.to_json() + "\n" for e in examples))
        paths[split] = path
    return paths


def reward(task: str, answer: str, reference: str) -> float:
    """The task's verifiable reward of ``answer`` (0 or 1)."""
    return TASKS[task].reward(answer, reference)
