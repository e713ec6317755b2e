"""RL experts: GRPO (Shao et al. 2024, DeepSeekMath §4.1) with the task's verifiable reward.

Each step:

1. draw ``grpo_prompts`` prompts of the task's train split (seeded) and sample ``grpo_group``
   answers to each at ``grpo_temperature`` from the current policy
   (:func:`experiments.sampling.decode`, KV cache, stops at EOS);
2. score every answer with :func:`experiments.tasks.reward` (0 or 1);
3. group-normalised advantages A_i = (r_i − mean_g r) / (std_g r + 1e-4), the same for every
   token of answer i (a group with equal rewards gives zero advantages: no gradient);
4. one on-policy update of the policy-gradient loss
   L = −Σ_{i,t} A_i log π(o_{i,t} | q, o_{i,<t}) / Σ_i |o_i| (answer tokens, EOS included). With
   one update per batch the PPO ratio is 1 and the clipped surrogate reduces to this; the
   token-level normalisation is DAPO's (Yu et al. 2025);
5. optionally (``grpo_kl`` = β > 0) + β · KL(π ‖ π_base) with the per-token k3 estimator
   exp(log π_base − log π) − (log π_base − log π) − 1, the base frozen (DeepSeekMath eq. 4).
   The default β = 0 follows DAPO / Dr. GRPO, which drop it.

AdamW without weight decay, constant learning rate after a 10 % warmup.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common, sampling, tasks
from experiments.config import Config
from experiments.data import TaskData
from jaxmerge import models


def group_advantages(rewards: np.ndarray, group: int) -> np.ndarray:
    """(r − group mean) / (group std + 1e-4), groups of ``group`` consecutive answers."""
    grouped = rewards.reshape(-1, group)
    advantages = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, keepdims=True)
                                                               + 1e-4)
    return advantages.reshape(-1)


def policy_loss(graphdef, params, reference, batch, kl_coefficient: float):
    """The GRPO loss of one batch of sampled answers (see the module docstring)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    log_probs = common.token_log_probs(models.apply(graphdef, params, inputs),
                                       batch["input_ids"])
    mask = batch["target_mask"].astype(jnp.float32)
    tokens = jnp.maximum(mask.sum(), 1.0)
    loss = -(batch["advantages"][:, None] * log_probs * mask).sum() / tokens
    if kl_coefficient > 0:
        reference_log_probs = jax.lax.stop_gradient(common.token_log_probs(
            models.apply(graphdef, reference, inputs), batch["input_ids"]))
        delta = reference_log_probs - log_probs
        loss += kl_coefficient * ((jnp.exp(delta) - delta - 1.0) * mask).sum() / tokens
    return loss


def train_grpo(config: Config, graphdef, params, data: TaskData, tokenizer, seed: int
               ) -> tuple[models.Params, dict]:
    """GRPO on ``data``'s train prompts from ``params``; returns the params and a record
    (mean reward per step, the fraction of groups with a learning signal)."""
    start = time.perf_counter()
    reference = params
    warmup = max(config.grpo_steps // 10, 1)
    schedule = optax.linear_schedule(0.0, config.grpo_lr, warmup)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.0))
    opt_state = optimizer.init(params)
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)

    @jax.jit
    def update(params, opt_state, batch):
        loss, grads = jax.value_and_grad(policy_loss, argnums=1)(
            graphdef, params, reference, batch, config.grpo_kl)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train = data.encoded["train"]
    references = data.references("train")
    group = config.grpo_group
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    rewards_curve, signal_curve = [], []
    for index, rows in enumerate(common.batches(rng, len(train), config.grpo_prompts,
                                                config.grpo_steps)):
        rows = np.repeat(rows, group)
        prompts, prompt_mask = train.prompts[rows], train.prompt_mask[rows]
        tokens, answer_mask = sampling.decode(
            graphdef, params, jnp.asarray(prompts), jnp.asarray(prompt_mask),
            jax.random.fold_in(key, index), config.grpo_temperature,
            max_new_tokens=data.max_new_tokens, eos_id=eos, pad_id=pad)
        tokens, answer_mask = np.asarray(tokens), np.asarray(answer_mask)
        answers = sampling.answers(tokenizer, tokens, eos)
        rewards = np.asarray([tasks.reward(data.name, answer, references[row])
                              for answer, row in zip(answers, rows, strict=True)], np.float32)
        advantages = group_advantages(rewards, group)
        batch = {
            "input_ids": jnp.asarray(np.concatenate([prompts, tokens], 1)),
            "attention_mask": jnp.asarray(np.concatenate([prompt_mask, answer_mask], 1),
                                          jnp.int32),
            "target_mask": jnp.asarray(np.concatenate([np.zeros_like(prompt_mask, bool),
                                                       answer_mask], 1)),
            "advantages": jnp.asarray(advantages),
        }
        params, opt_state, loss = update(params, opt_state, batch)
        rewards_curve.append(float(rewards.mean()))
        signal_curve.append(float((rewards.reshape(-1, group).std(1) > 0).mean()))
        if index % 10 == 0 or index == config.grpo_steps - 1:
            logging.info("grpo %s step %d reward %.3f (last 10: %.3f) loss %.4f", data.name,
                         index, rewards_curve[-1], np.mean(rewards_curve[-10:]), float(loss))
    return params, {"regime": "rl", "task": data.name, "reward_curve": rewards_curve,
                    "signal_curve": signal_curve,
                    "seconds": round(time.perf_counter() - start, 1)}
