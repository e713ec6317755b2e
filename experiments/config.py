"""Settings of a testbed run: one frozen dataclass, three presets.

- ``tiny``: the default of ``python -m experiments.run --base=tiny``; a 4-layer, 128-wide Llama
  pretrained from scratch on this CPU (the acceptance run: under an hour on 2 cores).
- ``quick``: seconds-scale sizes for the end-to-end test (``--quick``); the numbers mean
  nothing, the pipeline is exercised.
- ``smollm2``: the real SmolLM2-135M-Instruct as the base (its chat template frames the
  prompts; no pretraining); sized for a GPU.

Any field can be overridden from the command line (``--set=grpo_steps=50,sft_lr=1e-4``).
"""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting that changes a result (it is recorded in the results JSON)."""

    base: str = "tiny"
    seed: int = 0
    # data: examples per task and split (train is capped by a task's distinct prompts)
    train_size: int = 4000
    tool_train_size: int = 500
    validation_size: int = 100
    test_size: int = 200
    # the tiny base (Llama architecture)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    # pretraining of the tiny base
    pretrain_steps: int = 2000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    pretrain_weight_decay: float = 0.1
    pretrain_correct: float = 0.3
    pretrain_prompt_weight: float = 0.1
    # SFT experts
    sft_steps: int = 200
    sft_batch: int = 32
    sft_lr: float = 1e-3
    # GRPO experts
    grpo_steps: int = 300
    grpo_prompts: int = 8
    grpo_group: int = 8
    grpo_lr: float = 3e-4
    grpo_temperature: float = 1.0
    grpo_kl: float = 0.0
    # evaluation and merging
    eval_batch: int = 100
    extra_new_tokens: int = 8
    methods: tuple[str, ...] = ()
    fisher_examples: int = 100
    chat_template: bool = False
    keep_merges: bool = True
    slerp_pairs: bool = True
    plots: bool = True
    shared_shapes: bool = False
    merge_via_cli: bool = True
    merge_timeout: float = 120.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, text: str) -> Config:
        """``"name=value,name=value"`` (values parsed as JSON, else kept as strings)."""
        changes = {}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            if name not in fields:
                raise ValueError(f"unknown setting {name!r}; settings: {', '.join(fields)}")
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            if name == "methods":
                parsed = tuple(filter(None, str(value).split("+")))
            changes[name] = parsed
        return self.replace(**changes)


PRESETS = {
    "tiny": Config(),
    "quick": Config(
        train_size=64, tool_train_size=64, validation_size=8, test_size=16,
        hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
        pretrain_steps=30, pretrain_batch=16, sft_steps=4, sft_batch=8, grpo_steps=2,
        grpo_prompts=4, grpo_group=4, eval_batch=16, extra_new_tokens=2, fisher_examples=8,
        methods=("task_arithmetic", "sar", "slerp"), slerp_pairs=False, plots=False,
        shared_shapes=True, merge_via_cli=False),
    "smollm2": Config(
        base="smollm2", chat_template=True, train_size=2000, tool_train_size=500,
        sft_steps=300, sft_batch=16, sft_lr=2e-5, grpo_steps=100, grpo_prompts=8, grpo_group=8,
        grpo_lr=1e-6, grpo_kl=0.0, eval_batch=50, keep_merges=False, merge_timeout=600.0),
}
