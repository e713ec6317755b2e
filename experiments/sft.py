"""SFT experts: supervised fine-tuning of the base on one task's reference answers.

Loss: mean next-token cross-entropy over the response tokens (EOS included) of a batch, the
prompt unscored (as :func:`jaxmerge.fisher.data.tokenize` marks them). AdamW, no weight decay
(so only entries with a gradient move), linear warmup over 10 % of the steps, cosine decay;
batches are drawn from the task's train split in seeded random order.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments.config import Config
from experiments.data import TaskData
from jaxmerge import models


def response_loss(graphdef, params, batch):
    """Mean negative log-likelihood of the response tokens."""
    logits = models.apply(graphdef, params, {"input_ids": batch["input_ids"],
                                             "attention_mask": batch["attention_mask"]})
    log_probs = common.token_log_probs(logits, batch["input_ids"])
    mask = batch["target_mask"].astype(jnp.float32)
    return -(log_probs * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def train_sft(config: Config, graphdef, params, data: TaskData, seed: int
              ) -> tuple[models.Params, dict]:
    """Fine-tunes ``params`` on ``data``'s train split; returns the params and a record."""
    start = time.perf_counter()
    optimizer = common.adamw(config.sft_lr, config.sft_steps, config.sft_steps // 10, 0.0)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(response_loss, argnums=1)(graphdef, params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train = data.encoded["train"]
    rng = np.random.default_rng(seed)
    curve = []
    for index, rows in enumerate(common.batches(rng, len(train), config.sft_batch,
                                                config.sft_steps)):
        params, opt_state, loss = step(params, opt_state, train.training_batch(rows))
        if index % 20 == 0 or index == config.sft_steps - 1:
            curve.append((index, float(loss)))
            logging.info("sft %s step %d loss %.4f", data.name, index, float(loss))
    return params, {"regime": "sft", "task": data.name, "loss_curve": curve,
                    "seconds": round(time.perf_counter() - start, 1)}
