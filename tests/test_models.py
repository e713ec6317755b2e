"""jaxmerge.models against transformers (PyTorch CPU, float32, eager attention).

Every expected value comes from running the transformers model on the same weights and inputs:
logits, greedy generations, RoPE frequencies and gradients. Tiny random models of each family
cover GQA, tied and untied embeddings, biases, Qwen3 q/k norms, llama3 RoPE scaling and sliding
windows; the real SmolLM2-135M checks a full-size model.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmerge import models
from jaxmerge.errors import CheckpointError, ConfigError
from jaxmerge.io.safetensors_io import Checkpoint
from tests.tiny_models import FAMILIES, make_tiny_model

LOGIT_TOLERANCE = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}

CASES = {
    **{f"{family}-untied": (family, {}) for family in FAMILIES},
    **{f"{family}-tied": (family, {"tie_word_embeddings": True}) for family in FAMILIES},
    "llama-llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE,
                                    "max_position_embeddings": 1024}),
    "qwen2-linear-rope": ("qwen2", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-biases-mha": ("llama", {"attention_bias": True, "mlp_bias": True,
                                   "num_key_value_heads": 4}),
    "qwen3-attention-bias": ("qwen3", {"attention_bias": True}),
    "mistral-window": ("mistral", {"sliding_window": 4}),
    "qwen2-window-layer-1": ("qwen2", {"use_sliding_window": True, "sliding_window": 4,
                                       "max_window_layers": 1}),
}
GENERATE_CASES = ("llama-untied", "qwen2-tied", "qwen3-untied", "mistral-window")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(case) -> (checkpoint_dir, torch_model)``, each built once per module."""
    built = {}

    def get(case):
        if case not in built:
            family, overrides = CASES[case]
            out = tmp_path_factory.mktemp(case)
            built[case] = make_tiny_model(family, out, seed=len(built), **overrides)
        return built[case]

    return get


def padded_batch(seed: int = 0, vocab: int = 128, length: int = 10, side: str = "left"):
    """Three sequences of 10, 7 and 3 real tokens, padded with id 0 on ``side``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (3, length))
    mask = np.ones((3, length), np.int64)
    for row, real in enumerate((length, 7, 3)):
        pad = slice(0, length - real) if side == "left" else slice(real, length)
        mask[row, pad] = 0
    return np.where(mask > 0, ids, 0), mask


def torch_logits(model, ids, mask, positions=None) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=None if positions is None else torch.tensor(positions))
    return out.logits.numpy()


def max_real_diff(logits, reference, mask) -> float:
    """Max |a - b| over the real (non-padding) positions."""
    return float(np.abs(np.asarray(logits) - reference)[mask > 0].max())


# --------------------------------------------------------------------------- logit parity


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tiny, case):
    directory, reference = tiny(case)
    model = models.load_model(directory)
    # Left padding with transformers' generate-style position ids, then right padding with
    # its default arange positions.
    ids, mask = padded_batch(side="left")
    positions = np.asarray(models.positions_from_mask(mask))
    expected = torch_logits(reference, ids, mask, positions)
    left = max_real_diff(models.forward(model, ids, mask), expected, mask)
    ids, mask = padded_batch(seed=1, side="right")
    expected_right = torch_logits(reference, ids, mask)
    right = max_real_diff(models.forward(model, ids, mask), expected_right, mask)
    print(f"{case}: max |logit diff| left={left:.2e} right={right:.2e} "
          f"(max |logit| {np.abs(expected).max():.2f})")
    assert left <= LOGIT_TOLERANCE and right <= LOGIT_TOLERANCE
    assert np.abs(expected).max() > 1.0  # logits of a few units: the tolerance is tight


def test_positions_follow_transformers_generate(tiny):
    # RoPE only sees position differences, so logits cannot catch an offset: compare directly.
    _, reference = tiny("llama-untied")
    for side in ("left", "right"):
        ids, mask = padded_batch(side=side)
        expected = reference._prepare_position_ids_for_generation(
            torch.tensor(ids), {"attention_mask": torch.tensor(mask)}).numpy()
        np.testing.assert_array_equal(models.positions_from_mask(mask), expected)


@pytest.mark.parametrize("case", ["llama-untied", "llama-llama3-rope", "qwen2-linear-rope",
                                  "qwen3-untied"])
def test_rope_frequencies_match_transformers(tiny, case):
    directory, reference = tiny(case)
    config = models.ModelConfig.from_dir(directory)
    ours = models.inverse_frequencies(config.rope, config.head_dim)
    np.testing.assert_allclose(ours, reference.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


def test_llama3_scaling_changes_frequencies():
    config = models.ModelConfig.from_hf(
        {**_llama_dict(), "rope_parameters": {"rope_theta": 500000.0, **LLAMA3_ROPE}})
    scaled = models.inverse_frequencies(config.rope, 8)
    plain = models.inverse_frequencies(models.RopeConfig(theta=500000.0), 8)
    # With theta 5e5, head_dim 8 and a 256-token original context the wavelengths are 6, 167,
    # 4e3 and 1e5: the first is kept, the second interpolated, the others divided by 8.
    assert scaled[0] == plain[0]
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)
    assert plain[1] / 8.0 < scaled[1] < plain[1]


def test_sliding_window_is_applied(tiny):
    directory, _ = tiny("mistral-window")
    windowed = models.load_model(directory)
    config = windowed.config
    full = models.from_params(dataclasses.replace(config, sliding_windows=(None, None)),
                              models.split(windowed)[1])
    ids, mask = padded_batch()
    difference = np.abs(np.asarray(models.forward(windowed, ids, mask))
                        - np.asarray(models.forward(full, ids, mask)))
    assert difference[0, :4].max() == 0.0  # the first 4 tokens see the same keys
    assert difference[0, 4:].max() > 1e-3


def test_bfloat16_params_run_close_to_float32(tiny):
    directory, _ = tiny("qwen3-untied")
    ids, mask = padded_batch()
    full = np.asarray(models.forward(models.load_model(directory), ids, mask))
    half_model = models.load_model(directory, dtype=jnp.bfloat16)
    assert half_model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    half = models.forward(half_model, ids, mask)
    assert half.dtype == jnp.float32
    assert max_real_diff(half, full, mask) < 0.05 * np.abs(full).max()


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate_matches_transformers(tiny, case):
    directory, reference = tiny(case)
    model = models.load_model(directory)
    ids, mask = padded_batch(seed=2)
    max_new = 8

    def hf_generate(eos):
        with torch.no_grad():
            return reference.generate(
                input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0,
            ).numpy()

    free = hf_generate(None)
    ours = np.asarray(models.generate(model, ids, mask, max_new, eos_token_id=None,
                                      pad_token_id=0))
    np.testing.assert_array_equal(ours, free)
    # Stop at EOS: take the token row 0 emitted third as EOS, so row 0 stops early.
    eos = int(free[0, ids.shape[1] + 2])
    stopped = hf_generate(eos)
    ours = np.asarray(models.generate(model, ids, mask, max_new, eos_token_id=[eos],
                                      pad_token_id=0))
    length = stopped.shape[1]
    np.testing.assert_array_equal(ours[:, :length], stopped)
    assert np.all(ours[:, length:] == 0)
    after_eos = ours[0, ids.shape[1]:][np.argmax(ours[0, ids.shape[1]:] == eos) + 1:]
    assert after_eos.size and np.all(after_eos == 0)


def test_generate_rejects_right_padding(tiny):
    directory, _ = tiny("llama-untied")
    ids, mask = padded_batch(side="right")
    with pytest.raises(ValueError, match="left padding"):
        models.generate(models.load_model(directory), ids, mask, 2)


# --------------------------------------------------------------------------- functional form


def test_gradients_match_torch(tiny):
    """``jax.grad`` of the functional form equals torch autograd, mapped back to HF names."""
    directory, reference = tiny("qwen3-tied")
    apply_fn, params = models.functional(models.load_model(directory))
    ids, mask = padded_batch(seed=3)
    positions = np.asarray(models.positions_from_mask(mask))
    weights = (mask[:, :-1] * mask[:, 1:]).astype(np.float32)  # real token predicts real token

    def loss(params):
        logits = apply_fn(params, {"input_ids": ids, "attention_mask": mask})
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
        return -(picked * weights).sum() / weights.sum()

    grads = models.params_to_hf(jax.jit(jax.grad(loss))(params))
    reference.zero_grad()
    logits = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions)).logits
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = log_probs.gather(-1, torch.tensor(ids[:, 1:, None])).squeeze(-1)
    w = torch.tensor(weights)
    (-(picked * w).sum() / w.sum()).backward()
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        scale = np.abs(expected[name]).max()
        assert np.abs(grad - expected[name]).max() <= 1e-4 * max(scale, 1.0), name


# --------------------------------------------------------------------------- weight mapping


@pytest.mark.parametrize("case", ["llama-untied", "qwen2-tied", "qwen3-attention-bias",
                                  "llama-biases-mha"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_hf_names_params_hf_names(tiny, tmp_path, case, dtype):
    _, reference = tiny(case)
    copy.deepcopy(reference).to(getattr(torch, dtype)).save_pretrained(tmp_path)
    with Checkpoint.open(tmp_path) as checkpoint:
        tensors = {name: checkpoint.read(name) for name in checkpoint.tensors}
        config = models.ModelConfig.from_hf(checkpoint.config)
    params = models.params_from_hf(tensors, config)
    back = models.params_to_hf(params)
    assert set(back) == set(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array, err_msg=name)
    loaded = models.load_params(tmp_path, dtype=None)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, params))
    kernel = params["layers"][0]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(kernel, tensors["model.layers.0.self_attn.q_proj.weight"].T)


def test_rename_table_is_a_bijection(tiny):
    directory, _ = tiny("qwen3-attention-bias")
    shapes = models.hf_shapes(models.ModelConfig.from_dir(directory))
    assert "lm_head.weight" in shapes and "model.layers.1.self_attn.k_norm.weight" in shapes
    for name in shapes:
        path, transpose = models.hf_to_nnx(name)
        assert models.nnx_to_hf(path) == (name, transpose)


def test_missing_and_misshaped_tensors_are_named(tiny, tmp_path):
    from safetensors.numpy import save_file

    directory, _ = tiny("llama-untied")
    with Checkpoint.open(directory) as checkpoint:
        tensors = {name: checkpoint.read(name) for name in checkpoint.tensors}
        config = dict(checkpoint.config)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(CheckpointError) as error:
        models.load_model(tmp_path)
    message = str(error.value)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in message
    assert "'model.layers.0.mlp.down_proj.weight'" in message
    assert str(tmp_path / "model.safetensors") in message and "[32, 48]" in message


# --------------------------------------------------------------------------- config parsing


def _llama_dict(**overrides) -> dict:
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64,
              "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}
    return {**config, **overrides}


def test_config_reads_old_and_new_rope_layouts():
    new = models.ModelConfig.from_hf(
        _llama_dict(rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}))
    old = models.ModelConfig.from_hf(
        _llama_dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE)))
    assert new == old
    assert new.rope.rope_type == "llama3" and new.rope.original_max_position_embeddings == 256
    assert new.head_dim == 8 and new.num_groups == 2 and new.rms_norm_eps == 1e-5
    default = models.ModelConfig.from_hf(_llama_dict())
    assert default.rope == models.RopeConfig(theta=10000.0)


@pytest.mark.parametrize("overrides, field", [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures="),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "rope_type='dynamic'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        models.ModelConfig.from_hf(_llama_dict(**overrides))


def test_config_sliding_windows_per_family():
    base = {k: v for k, v in _llama_dict().items() if k != "architectures"}
    mistral = models.ModelConfig.from_hf({**base, "model_type": "mistral", "sliding_window": 8})
    assert mistral.sliding_windows == (8, 8)
    qwen_off = models.ModelConfig.from_hf({**base, "model_type": "qwen2", "sliding_window": 8})
    assert qwen_off.sliding_windows == (None, None) and qwen_off.qkv_bias
    qwen_on = models.ModelConfig.from_hf({**base, "model_type": "qwen2", "sliding_window": 8,
                                          "use_sliding_window": True, "max_window_layers": 1})
    assert qwen_on.sliding_windows == (None, 8)


# --------------------------------------------------------------------------- SmolLM2-135M


@pytest.mark.smollm2
def test_smollm2_logits_and_generation_match_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = smollm2["base"]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "def fibonacci(n):\n    "],
                      return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] <= 16 and mask.min() == 0  # short, and left padding is exercised
    reference = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()
    model = models.load_model(directory)  # bf16 on disk, float32 parameters

    expected = torch_logits(reference, ids, mask, np.asarray(models.positions_from_mask(mask)))
    diff = max_real_diff(models.forward(model, ids, mask), expected, mask)
    print(f"SmolLM2-135M: max |logit diff| = {diff:.2e} (max |logit| "
          f"{np.abs(expected).max():.1f})")
    assert diff <= 1e-3

    eos, pad = reference.config.eos_token_id, tokenizer.pad_token_id
    with torch.no_grad():
        expected_tokens = reference.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
            do_sample=False, eos_token_id=eos, pad_token_id=pad).numpy()
    tokens = np.asarray(models.generate(model, ids, mask, 8, eos_token_id=eos,
                                        pad_token_id=pad))
    length = expected_tokens.shape[1]
    np.testing.assert_array_equal(tokens[:, :length], expected_tokens)
    assert np.all(tokens[:, length:] == pad)
