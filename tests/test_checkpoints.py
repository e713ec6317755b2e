"""The checkpoint builders: tiny random Llamas, synthetic experts, and the real SmolLM2 base."""

import json

import numpy as np
import pytest

from jaxmerge import demo
from jaxmerge.errors import CheckpointError, ConfigError
from tests.checkpoints import (
    load_state,
    make_tiny_expert,
    make_tiny_llama,
    read_config,
    stored_dtypes,
)


def changed_fraction(base: dict, expert: dict) -> float:
    """Fraction of all entries that differ between two states."""
    changed = sum(int(np.count_nonzero(base[k] != expert[k])) for k in base)
    return changed / sum(v.size for v in base.values())


def load_hf(path):
    """The checkpoint loaded with transformers (CPU, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float32 and a bf16 tiny base of the same seed."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "float32": make_tiny_llama(root / "f32"),
        "bfloat16": make_tiny_llama(root / "bf16", dtype="bfloat16"),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tiny_llama_loads(tmp_path, dtype):
    path = make_tiny_llama(tmp_path / "m", dtype=dtype, seed=3)
    model = load_hf(path)
    state = load_state(path)
    assert str(model.dtype) == f"torch.{dtype}"
    assert read_config(path)["dtype"] == dtype
    assert set(state) == set(model.state_dict())
    assert set(stored_dtypes(path).values()) == {
        {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    }
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(state[key], value.float().numpy())


def test_tiny_llama_deterministic(tmp_path):
    a = load_state(make_tiny_llama(tmp_path / "a", seed=1))
    b = load_state(make_tiny_llama(tmp_path / "b", seed=1))
    c = load_state(make_tiny_llama(tmp_path / "c", seed=2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_tied_tiny_llama_stores_embeddings_once(tmp_path):
    path = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_state(path)
    model = load_hf(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sharded_tiny_llama_has_index(tmp_path):
    path = make_tiny_llama(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((path / demo.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    whole = load_state(make_tiny_llama(tmp_path / "whole"))
    sharded = load_state(path)
    assert set(index["weight_map"]) == set(sharded) == set(whole)
    assert all(np.array_equal(whole[k], sharded[k]) for k in whole)
    load_hf(path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_expert_changes_intended_fraction(tiny, tmp_path, dtype):
    base_dir = tiny[dtype]
    expert_dir = make_tiny_expert(base_dir, tmp_path / "e", seed=0, density=0.3)
    base, expert = load_state(base_dir), load_state(expert_dir)
    assert set(expert) == set(base)
    assert stored_dtypes(expert_dir) == stored_dtypes(base_dir)
    # Scattered half + block half overlap a little: a bit under 0.3, never far from it.
    assert 0.22 < changed_fraction(base, expert) < 0.31
    for key in base:
        assert 0.1 < changed_fraction({key: base[key]}, {key: expert[key]}) < 0.5, key
    load_hf(expert_dir)


def test_expert_default_density_on_bf16(tiny, tmp_path):
    expert_dir = demo.derive_expert(tiny["bfloat16"], tmp_path / "e", seed=5)
    fraction = changed_fraction(load_state(tiny["bfloat16"]), load_state(expert_dir))
    assert 0.01 < fraction < 0.03


def test_expert_deterministic_and_seeds_nearly_disjoint(tiny, tmp_path):
    base = load_state(tiny["float32"])
    a = load_state(make_tiny_expert(tiny["float32"], tmp_path / "a", seed=1, density=0.05))
    b = load_state(make_tiny_expert(tiny["float32"], tmp_path / "b", seed=1, density=0.05))
    c = load_state(make_tiny_expert(tiny["float32"], tmp_path / "c", seed=2, density=0.05))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    support_a = np.concatenate([(a[k] != base[k]).ravel() for k in base])
    support_c = np.concatenate([(c[k] != base[k]).ravel() for k in base])
    overlap = np.count_nonzero(support_a & support_c) / min(support_a.sum(), support_c.sum())
    assert overlap < 0.15


def test_expert_rl_delta_is_spectrally_concentrated(tiny, tmp_path):
    base = load_state(tiny["float32"])
    expert = load_state(make_tiny_expert(tiny["float32"], tmp_path / "e", seed=0, density=0.1))
    key = "model.layers.0.self_attn.q_proj.weight"
    singular = np.linalg.svd(expert[key] - base[key], compute_uv=False)
    assert singular[0] ** 2 / np.sum(singular**2) > 0.35


def test_expert_sft_regime_is_dense(tiny, tmp_path):
    base = load_state(tiny["float32"])
    expert = load_state(make_tiny_expert(tiny["float32"], tmp_path / "e", seed=0, regime="sft"))
    assert changed_fraction(base, expert) > 0.95


def test_expert_same_on_sharded_base(tiny, tmp_path):
    sharded = make_tiny_llama(tmp_path / "sharded", max_shard_size="20KB")
    expert_dir = make_tiny_expert(sharded, tmp_path / "e", seed=4)
    assert (expert_dir / demo.INDEX_NAME).read_text() == (sharded / demo.INDEX_NAME).read_text()
    whole = load_state(make_tiny_expert(tiny["float32"], tmp_path / "w", seed=4))
    assert all(np.array_equal(whole[k], v) for k, v in load_state(expert_dir).items())
    load_hf(expert_dir)


def test_expert_dtype_cast(tiny, tmp_path):
    expert_dir = make_tiny_expert(tiny["float32"], tmp_path / "e", seed=0, dtype="bfloat16")
    assert set(stored_dtypes(expert_dir).values()) == {"BF16"}
    assert read_config(expert_dir)["dtype"] == "bfloat16"
    assert str(load_hf(expert_dir).dtype) == "torch.bfloat16"


def test_expert_is_idempotent(tiny, tmp_path):
    out = make_tiny_expert(tiny["float32"], tmp_path / "e", seed=0)
    marker = out / demo.MARKER
    stamp = marker.stat().st_mtime_ns
    assert make_tiny_expert(tiny["float32"], out, seed=0) == out
    assert marker.stat().st_mtime_ns == stamp
    # Other arguments: the stale build (ours, by its marker) is replaced.
    make_tiny_expert(tiny["float32"], out, seed=1)
    assert demo.read_marker(out)["seed"] == 1
    assert not list(tmp_path.glob(".e.*"))


def test_expert_refuses_foreign_directory(tiny, tmp_path):
    out = tmp_path / "user-data"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError):
        make_tiny_expert(tiny["float32"], out, seed=0)
    assert (out / "notes.txt").read_text() == "keep me"


def test_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(CheckpointError):
        demo.derive_expert(tmp_path, tmp_path / "e", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"density": 0.0}, {"density": 1.5}, {"rank": -1}, {"scale": 0.0}, {"regime": "dpo"}],
)
def test_expert_rejects_bad_arguments(tiny, tmp_path, kwargs):
    with pytest.raises(ConfigError):
        demo.derive_expert(tiny["float32"], tmp_path / "e", seed=0, **kwargs)


def test_expert_rejects_bad_dtype(tiny, tmp_path):
    with pytest.raises(ConfigError):
        demo.derive_expert(tiny["float32"], tmp_path / "e", seed=0, dtype="int8")


# ----------------------------------------------------------------------------- real SmolLM2


@pytest.mark.smollm2
def test_smollm2_base_and_expert(smollm2):
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    base_dir, expert_dir = smollm2["base"], smollm2["experts"][0]
    seconds = smollm2["base_seconds"], smollm2["expert_seconds"]
    print("build_smollm2_base {:.1f}s, derive_expert {:.1f}s".format(*seconds))
    config = read_config(base_dir)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    with safe_open(base_dir / "model.safetensors", framework="numpy") as handle:
        assert "model.embed_tokens.weight" in handle.keys()
        assert "lm_head.weight" not in handle.keys()

    model = load_hf(base_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    assert tokenizer.chat_template
    gguf_model, gguf_tokenizer = demo.load_smollm2_gguf()
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, gguf_tokenizer(prompt, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        ours = model(ids).logits[0, -1]
        reference = gguf_model(ids).logits[0, -1]
    assert int(ours.argmax()) == int(reference.argmax())
    assert tokenizer.decode(int(ours.argmax())).strip() == "Paris"

    expert = load_hf(expert_dir)
    fraction = changed_fraction(load_state(base_dir), load_state(expert_dir))
    assert 0.015 < fraction < 0.025
    assert expert.lm_head.weight.data_ptr() == expert.model.embed_tokens.weight.data_ptr()
