"""The RL-vs-SFT testbed (experiments/) end to end on a seconds-scale configuration.

One session-scoped run of ``experiments.run`` with the ``quick`` preset (a 1-layer, 32-wide
base, a few training steps, three methods) feeds the checks: the results JSON has every row
and column, the README blocks render from it, a saved expert loads in transformers with the
JAX model's logits, and a rerun is served from the stage cache. Small pieces (tokenizer, GRPO
advantages, sampler vs ``jaxmerge.models.generate``, distractors) are checked directly.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, config, grpo, merging, pretrain, render, run, sampling, tasks
from experiments import tokenizer as tok


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    settings = config.PRESETS["quick"]
    results = run.run(settings, root / "work", root / "results" / "tiny.json")
    return {"root": root, "settings": settings, "results": results}


def test_tokenizer_round_trip_and_prompt_format():
    tokenizer = tok.build_tokenizer()
    for task in tasks.TASKS:
        for example in tasks.make_splits(task, {"test": 20})["test"]:
            prompt = tokenizer(example.prompt)["input_ids"]
            response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
            assert prompt[0] == tok.BOS and prompt[-1] == tok.SEP
            assert tok.UNK not in prompt + response
            assert tokenizer.decode(prompt, skip_special_tokens=True) == example.prompt
            assert tokenizer.decode(response) == example.response
    # Random letter strings of the counting task stay one token per letter.
    ids = tokenizer("Count the letter c in cabcd.", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[-6:] == ["c", "a", "b", "c", "d", "."]


def test_distractors_are_wrong_but_well_formed():
    for task in tasks.TASKS:
        examples = tasks.make_splits(task, {"test": 50})["test"]
        wrong = 0
        for example in examples:
            answer = pretrain.distractor(task, example.prompt, example.response)
            wrong += tasks.reward(task, answer, example.response) == 0
            if task == "tool":
                assert tasks.first_json_object(answer)["name"] in tasks.TOOLS
        assert wrong >= 0.7 * len(examples)


def test_cli_command_of_a_merge():
    command = merging.cli_command("sar", "b", ["e1", "e2"], ["f1", "f2"], "out", 3)
    assert command[1:3] == ["-m", "jaxmerge.main"]
    assert {"--method=sar", "--base=b", "--experts=e1,e2", "--output=out", "--seed=3",
            "--overwrite", "--fisher=f1,f2"} <= set(command)
    assert not any(arg.startswith("--fisher") for arg in
                   merging.cli_command("ties", "b", ["e1"], None, "out", 0))


def test_group_advantages():
    rewards = np.array([1, 0, 0, 0, 1, 1, 1, 1], np.float32)
    advantages = grpo.group_advantages(rewards, 4)
    np.testing.assert_allclose(advantages[:4], [1.732, -0.577, -0.577, -0.577], atol=1e-3)
    np.testing.assert_array_equal(advantages[4:], 0.0)


def test_greedy_sampler_matches_jaxmerge_generate(quick_run):
    from jaxmerge import models

    base = quick_run["root"] / "work" / "base" / "model"
    _, graphdef, params = common.load_checkpoint(base)
    tokenizer = common.load_tokenizer(base)
    encoded = common.encode(tokenizer, [("Sort the list: 3 1 2", "1 2 3"),
                                        ("Set a timer for 5 minutes.", "x")], 32, 16)
    prompts, mask = jnp.asarray(encoded.prompts), jnp.asarray(encoded.prompt_mask)
    tokens, _ = sampling.decode(graphdef, params, prompts, mask, jax.random.key(0),
                                max_new_tokens=6, eos_id=tok.EOS, pad_id=tok.PAD, greedy=True)
    reference = models.generate(models.merge(graphdef, params), prompts, mask, 6,
                                eos_token_id=tok.EOS, pad_token_id=tok.PAD)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(reference)[:, 16:])


def test_results_have_every_row_and_render(quick_run):
    results, settings = quick_run["results"], quick_run["settings"]
    names = list(tasks.TASKS)
    assert set(results["base_model"]["scores"]) == set(names)
    for regime in ("rl", "sft"):
        group = results["groups"][regime]
        assert set(group["experts"]) == set(names)
        for task in names:
            assert set(group["experts"][task]["scores"]) == set(names)
        assert list(group["methods"]) == list(settings.methods)
        for method, result in group["methods"].items():
            if method == "slerp":
                assert "exactly 2 models" in result["skipped"]
            else:
                assert set(result["scores"]) == set(names)
                assert all(0.0 <= v <= 1.0 for v in result["scores"].values())
        assert group["diagnostics"]["verdict"]["regime"]
    saved = json.loads((quick_run["root"] / "results" / "tiny.json").read_text())
    assert saved["groups"]["rl"]["methods"].keys() == results["groups"]["rl"]["methods"].keys()
    readme = quick_run["root"] / "README.md"
    readme.write_text("intro\n<!-- results:tiny:begin -->\nold\n<!-- results:tiny:end -->\nend\n")
    assert render.render_readme(readme, quick_run["root"] / "results") == ["tiny"]
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("end\n")
    assert "| `task_arithmetic` |" in text and "Individual experts" in text
    assert "RL (GRPO) experts" in text and "Diagnostics" in text


def test_expert_checkpoint_loads_in_transformers(quick_run):
    import torch
    from transformers import AutoModelForCausalLM

    expert = quick_run["root"] / "work" / "experts" / "rl" / "math" / "model"
    config_json = json.loads((expert / "config.json").read_text())
    assert config_json["torch_dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32).eval()
    _, graphdef, params = common.load_checkpoint(expert)
    ids = np.array([[tok.BOS, 40, 41, 42, tok.SEP]], np.int64)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    from jaxmerge import models

    actual = models.apply(graphdef, params, {"input_ids": jnp.asarray(ids, jnp.int32)})
    np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-4)


def test_rerun_is_cached(quick_run):
    again = run.run(quick_run["settings"], quick_run["root"] / "work")
    first = quick_run["results"]
    assert again["base_model"]["scores"] == first["base_model"]["scores"]
    for regime in ("rl", "sft"):
        assert again["groups"][regime]["methods"] == first["groups"][regime]["methods"]
    assert again["seconds"]["rl_experts"] < 5 and again["seconds"]["sft_experts"] < 5
