"""The tiny base: a small Llama pretrained from scratch on the tasks' text, with noisy answers.

A base for RL must be able to produce the right answer now and then (GRPO learns nothing from
a group whose rewards are all equal) but should not already be an expert. The pretraining
corpus therefore pairs fresh task prompts (never a validation or test prompt) with the correct
answer with probability ``pretrain_correct`` (0.3) and otherwise with a *distractor*: a fixed,
plausible-looking wrong answer of the same format (:func:`distractor`), as a web corpus mixes
good and bad solutions. The base learns both behaviours; sampled at temperature 1 it is right
about ``pretrain_correct`` of the time at best, and greedy decoding mostly follows the more
frequent distractor. Fine-tuning (SFT on reference answers, or GRPO on the reward) has to move
it to the correct behaviour of one task: a skill the base holds but does not use.

Training: next-token cross-entropy on every token after BOS, prompt tokens weighted by
``pretrain_prompt_weight`` (0.1) and response tokens (with EOS) by 1; AdamW with warmup and
cosine decay (:func:`experiments.common.adamw`); fixed-shape batches, one compiled step.
"""

from __future__ import annotations

import json
import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import common, evaluation, tasks
from experiments import tokenizer as tok
from experiments.config import Config
from experiments.data import TaskData
from jaxmerge import models


def distractor(task: str, prompt: str, response: str) -> str:
    """The wrong answer of the noisy corpus: same format, a plausible slip that needs the same
    skill as the right answer (so the corpus teaches the skill through both).

    - math: stops one step early (the amount before the last buy or give-away);
    - tool: a number argument quoted as a string (``"amount":"51"``), or for the weather the
      other unit;
    - reasoning: swaps the operation (reverse ↔ sort), the first item for the last, or counts
      the *other* letters of the word.
    """
    if task == "math":
        numbers = [int(n) for n in re.findall(r"\d+", prompt)]
        steps = re.findall(r"(buys|gives away) (\d+)", prompt)
        total = numbers[0]
        for verb, amount in steps[:-1]:
            total += int(amount) if verb == "buys" else -int(amount)
        return str(total)
    if task == "tool":
        call = json.loads(response)
        arguments = dict(call["arguments"])
        if "unit" in arguments:
            arguments["unit"] = "celsius" if arguments["unit"] == "fahrenheit" else "fahrenheit"
        else:
            arguments = {k: str(v) if isinstance(v, int) else v for k, v in arguments.items()}
        return json.dumps({"name": call["name"], "arguments": arguments},
                          separators=(",", ":"))
    if task == "reasoning":
        if prompt.startswith("Count"):
            word = prompt.rstrip(".").split()[-1]
            return str(len(word) - int(response))
        items = prompt.split(":", 1)[1].split()
        if prompt.startswith("Give"):
            return items[0]
        if prompt.startswith("Reverse"):
            return " ".join(sorted(items))
        return " ".join(reversed(items))
    raise ValueError(f"unknown task {task!r}")


def corpus(config: Config, held_out: set[str], count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (prompt, answer) pairs: tasks drawn uniformly, prompts outside ``held_out``,
    answers correct with probability ``config.pretrain_correct``, else the distractor."""
    rng = np.random.default_rng(seed)
    names = list(tasks.TASKS)
    pairs = []
    while len(pairs) < count:
        name = names[rng.integers(len(names))]
        prompt, response = tasks.TASKS[name].make(rng)
        if prompt in held_out:
            continue
        if rng.random() >= config.pretrain_correct:
            response = distractor(name, prompt, response)
        pairs.append((prompt, response))
    return pairs


def model_config(config: Config, tokenizer) -> dict:
    vocab = -(-len(tokenizer) // 64) * 64
    return common.llama_config(vocab, config.hidden_size, config.num_layers, config.num_heads,
                               config.num_kv_heads, config.intermediate_size, 256)


def graphdef_of(hf_config: dict) -> nnx.GraphDef:
    """The static module structure of a model with this config (nothing allocated)."""
    config = models.ModelConfig.from_hf(hf_config)
    graphdef, _ = models.split(nnx.eval_shape(lambda: models.CausalLM(config,
                                                                      rngs=nnx.Rngs(0))))
    return graphdef


def weighted_loss(graphdef, params, batch, prompt_weight: float):
    """Cross-entropy with weight 1 on response tokens and ``prompt_weight`` on prompt tokens."""
    logits = models.apply(graphdef, params, {"input_ids": batch["input_ids"],
                                             "attention_mask": batch["attention_mask"]})
    log_probs = common.token_log_probs(logits, batch["input_ids"])
    real = batch["attention_mask"].at[:, 0].set(0).astype(jnp.float32)
    weights = jnp.where(batch["target_mask"], 1.0, prompt_weight) * real
    return -(log_probs * weights).sum() / weights.sum()


def pretrain(config: Config, prepared: dict[str, TaskData], out_dir, eval_every: int = 0
             ) -> dict:
    """Builds and trains the tiny base into ``out_dir`` (HF checkpoint, bf16); returns its
    training record (loss curve, validation accuracy greedy and sampled, seconds)."""
    start = time.perf_counter()
    out_dir = common.fresh_dir(out_dir)
    tokenizer = tok.build_tokenizer(out_dir / "tokenizer")
    hf_config = model_config(config, tokenizer)
    graphdef = graphdef_of(hf_config)
    seed = common.stable_seed(config.seed, "pretrain")
    params = common.init_params(hf_config, seed)
    held_out = {e.prompt for data in prepared.values()
                for split in ("validation", "test") for e in data.splits[split]}
    pool = min(config.pretrain_steps * config.pretrain_batch, 32768)
    pairs = corpus(config, held_out, pool, seed)
    prompt_lengths = [len(ids) for ids in tokenizer([p for p, _ in pairs])["input_ids"]]
    answer_lengths = [len(ids) + 1 for ids in tokenizer([r for _, r in pairs],
                                                         add_special_tokens=False)["input_ids"]]
    length = -(-max(p + a for p, a in zip(prompt_lengths, answer_lengths, strict=True)) // 8) * 8
    encoded = common.encode(tokenizer, pairs, length, max(prompt_lengths))
    optimizer = common.adamw(config.pretrain_lr, config.pretrain_steps,
                             config.pretrain_steps // 20, config.pretrain_weight_decay)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(weighted_loss, argnums=1)(
            graphdef, params, batch, config.pretrain_prompt_weight)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    curve = []
    for index, rows in enumerate(common.batches(rng, len(encoded), config.pretrain_batch,
                                                config.pretrain_steps)):
        params, opt_state, loss = step(params, opt_state, encoded.training_batch(rows))
        if index % 50 == 0 or index == config.pretrain_steps - 1:
            curve.append((index, float(loss)))
            logging.info("pretrain step %d loss %.4f", index, float(loss))
        if eval_every and index % eval_every == eval_every - 1:
            logging.info("pretrain step %d validation greedy %s sampled %s", index,
                         evaluation.scores(graphdef, params, tokenizer, prepared, "validation"),
                         evaluation.scores(graphdef, params, tokenizer, prepared, "validation",
                                           temperature=1.0))
    # Save in bf16 first and measure the saved (rounded) model: that is the base every expert
    # starts from and every task vector is measured against.
    tokenizer_dir = out_dir / "tokenizer"
    record = {"loss_curve": curve, "corpus_examples": len(pairs),
              "parameters": int(sum(x.size for x in jax.tree.leaves(params)))}
    common.save_checkpoint(out_dir / "model", params, hf_config, tokenizer_dir, record=record)
    _, _, params = common.load_checkpoint(out_dir / "model")
    record["validation_greedy"] = evaluation.scores(graphdef, params, tokenizer, prepared,
                                                    "validation", batch_size=config.eval_batch)
    record["validation_sampled"] = evaluation.scores(
        graphdef, params, tokenizer, prepared, "validation", batch_size=config.eval_batch,
        temperature=1.0, seed=seed)
    record["seconds"] = round(time.perf_counter() - start, 1)
    (out_dir / "model" / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
