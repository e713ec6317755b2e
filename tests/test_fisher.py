"""jaxmerge.fisher: the diagonal Fisher F_j = E[(∂ log p(y|x)/∂θ_j)²] over response tokens.

References: gradients of one unpadded example at a time (plain ``jax.grad``, and torch
autograd on the transformers twin of the tiny model), and the closed form of a linear
softmax (bigram) model. The command line runs in a subprocess (its absl flags clash with the
other command lines').
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import jaxmerge
from jaxmerge import models
from jaxmerge.errors import ConfigError
from jaxmerge.fisher import data, estimate
from jaxmerge.io.safetensors_io import Checkpoint
from tests.subprocesses import run_module
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

# Validation examples in the tiny tokenizer's words: prompts of several lengths, a plain
# text line, and an empty response (which still scores its EOS).
LINES = [
    {"prompt": "what is two plus three ?", "response": "five"},
    {"text": "the cat sat on the mat ."},
    {"prompt": "red", "response": "blue green yes"},
    {"prompt": "the dog is", "response": ""},
    {"prompt": "a cat sat on a mat . what is it ?", "response": "the cat"},
]


def write_jsonl(path, lines) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def read_tensors(directory) -> dict[str, np.ndarray]:
    with Checkpoint.open(directory) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.tensors}


def max_rel_diff(got: dict, expected: dict) -> float:
    """max over tensors of max|got - expected| / max|expected|."""
    assert set(got) == set(expected)
    worst = 0.0
    for name, value in expected.items():
        value = np.asarray(value, np.float64)
        scale = max(np.abs(value).max(), 1e-30)
        worst = max(worst, float(np.abs(np.asarray(got[name], np.float64) - value).max() / scale))
    return worst


def flat(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tied qwen3 tiny model with a tokenizer, its torch twin, and the validation file."""
    root = tmp_path_factory.mktemp("fisher")
    directory, torch_model = make_tiny_model("qwen3", root / "model", seed=3,
                                             tie_word_embeddings=True)
    tokenizer = make_tiny_tokenizer(directory)
    return {"dir": directory, "torch": torch_model, "tokenizer": tokenizer,
            "data": write_jsonl(root / "val.jsonl", LINES), "root": root}


@pytest.fixture(scope="module")
def library_fisher(tiny):
    """fisher_for_checkpoint on the tiny model (per_example, micro-batches of 2)."""
    return estimate.fisher_for_checkpoint(tiny["dir"], tiny["data"], batch_size=2,
                                          max_length=32)


# --------------------------------------------------------------------------- the estimator


def hand_examples() -> list[data.Tokenized]:
    """Five examples of 3 to 12 tokens with their first scored token (ids < 128)."""
    rng = np.random.default_rng(0)
    shapes = [(7, 3), (12, 5), (3, 1), (9, 9), (5, 2)]  # (length, first_target); 9: no target
    return [data.Tokenized(tuple(int(t) for t in rng.integers(3, 128, length)), first)
            for length, first in shapes]


def single_example_grads(apply_fn, params, example: data.Tokenized) -> dict:
    """∇ log p(y|x) of one unpadded example: plain jax.grad, no mask, no vmap."""
    ids = np.asarray(example.input_ids)[None]
    first = example.first_target

    def log_likelihood(params):
        logits = apply_fn(params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        log_probs = jax.nn.log_softmax(logits[0], axis=-1)
        positions = np.arange(first, ids.shape[1])
        return jnp.sum(log_probs[positions - 1, ids[0, positions]])

    return flat(jax.grad(log_likelihood)(params))


def test_fisher_equals_explicit_per_example_reference(tiny):
    """Batched, padded, vmapped estimate == mean of squared single-example gradients; the
    per_batch formula; per_example == per_batch at batch size 1; padding changes nothing."""
    apply_fn, params = models.functional(models.load_model(tiny["dir"]))
    examples = hand_examples()
    grads = [single_example_grads(apply_fn, params, example) for example in examples]
    n = len(examples)
    reference = {k: sum(g[k].astype(np.float64) ** 2 for g in grads) / n for k in grads[0]}
    assert all(np.abs(g[k]).max() == 0 for g in grads[3:4] for k in g)  # no target -> 0

    def run(batch_size, mode):
        batches = data.make_batches(examples, batch_size, max_length=32)
        fisher, stats = estimate.fisher_diagonal(apply_fn, params, batches, mode=mode)
        assert stats.num_examples == n and stats.num_tokens == 4 + 7 + 2 + 0 + 3
        return flat(fisher)

    per_example = run(3, "per_example")  # 2 batches; the second has a filler row
    diff = max_rel_diff(per_example, reference)
    print(f"per_example (batch 3) vs single-example jax.grad: max rel diff {diff:.2e}")
    assert diff < 1e-4
    assert all(value.dtype == np.float32 for value in per_example.values())

    single = run(1, "per_example")
    assert max_rel_diff(single, per_example) < 1e-4  # padded in a batch or alone: same F
    assert max_rel_diff(run(1, "per_batch"), single) < 1e-5

    batch_grads = [{k: sum(g[k].astype(np.float64) for g in grads[i:i + 3]) for k in grads[0]}
                   for i in (0, 3)]
    per_batch_reference = {k: sum(g[k] ** 2 for g in batch_grads) / n for k in grads[0]}
    per_batch = run(3, "per_batch")
    assert max_rel_diff(per_batch, per_batch_reference) < 1e-4
    assert max_rel_diff(per_batch, per_example) > 0.05  # the cross terms matter


def test_checkpoint_fisher_matches_torch_autograd(tiny, library_fisher):
    """The whole path (JSONL, tokenizer, batches, HF names) against torch per-example grads."""
    tensors, stats = library_fisher
    model, tokenizer = tiny["torch"], tiny["tokenizer"]
    squares, tokens = {}, 0
    for line in LINES:
        if "text" in line:
            ids, first = tokenizer(line["text"])["input_ids"], 1
        else:
            prompt = tokenizer(line["prompt"])["input_ids"]
            response = tokenizer(line["response"], add_special_tokens=False)["input_ids"]
            ids, first = prompt + response + [tokenizer.eos_token_id], len(prompt)
        tokens += len(ids) - first
        model.zero_grad()
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
        sum(log_probs[t - 1, ids[t]] for t in range(first, len(ids))).backward()
        for name, parameter in model.named_parameters():
            squares[name] = squares.get(name, 0.0) + parameter.grad.double().numpy() ** 2
    reference = {name: value / len(LINES) for name, value in squares.items()}
    assert stats.num_examples == len(LINES) and stats.num_tokens == tokens
    assert list(tensors) == list(read_tensors(tiny["dir"]))  # names and order of the model
    assert "lm_head.weight" not in tensors  # tied, as in the checkpoint
    diff = max_rel_diff(tensors, reference)
    print(f"checkpoint Fisher vs torch autograd: max rel diff {diff:.2e}")
    assert diff < 1e-4


def bigram_apply(params, batch):
    """A linear softmax model: logits_t = onehot(x_t) W + b (the next token given this one)."""
    return params["W"][batch["input_ids"]] + params["b"]


def bigram_fisher(params, sequences, mode, batch_size):
    """Closed form: ∇_W log p = Σ_t e_{x_{t-1}} ⊗ (e_{x_t} − p_{t-1}), ∇_b = Σ_t (e_{x_t} − p)."""
    W, b = (np.asarray(params[k], np.float64) for k in ("W", "b"))
    vocab = b.size
    grads = []
    for ids, first in sequences:
        gW, gb = np.zeros_like(W), np.zeros_like(b)
        for t in range(max(first, 1), len(ids)):
            z = W[ids[t - 1]] + b
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            residual = np.eye(vocab)[ids[t]] - p
            gW[ids[t - 1]] += residual
            gb += residual
        grads.append((gW, gb))
    if mode == "per_batch":
        grads = [tuple(sum(g[k] for g in grads[i:i + batch_size]) for k in (0, 1))
                 for i in range(0, len(grads), batch_size)]
    return {"W": sum(g[0] ** 2 for g in grads) / len(sequences),
            "b": sum(g[1] ** 2 for g in grads) / len(sequences)}


def bigram_batches(sequences, batch_size, pad_id=0):
    examples = [data.Tokenized(tuple(ids), first) for ids, first in sequences]
    return data.make_batches(examples, batch_size, pad_id=pad_id)


@pytest.mark.parametrize("mode", ["per_example", "per_batch"])
def test_linear_model_closed_form(mode):
    rng = np.random.default_rng(1)
    vocab = 7
    params = {"W": jnp.asarray(rng.normal(size=(vocab, vocab)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=vocab), jnp.float32)}
    sequences = [(list(rng.integers(0, vocab, n)), first)
                 for n, first in [(6, 2), (20, 1), (4, 3), (11, 7), (2, 1)]]
    fisher, stats = estimate.fisher_diagonal(bigram_apply, params,
                                             bigram_batches(sequences, 2), mode=mode)
    expected = bigram_fisher(params, sequences, mode, 2)
    assert stats.batch_shapes == ((2, 32), (2, 16))
    for key in ("W", "b"):
        np.testing.assert_allclose(fisher[key], expected[key], rtol=2e-5, atol=1e-7)
    assert np.abs(expected["W"]).max() > 0.1


def test_only_response_tokens_count():
    """Prompt tokens other than the last (the bigram's only context) and padding ids do not
    change F; an example with no response token adds a zero to the average."""
    rng = np.random.default_rng(2)
    params = {"W": jnp.asarray(rng.normal(size=(7, 7)), jnp.float32),
              "b": jnp.zeros(7, jnp.float32)}
    sequences = [([1, 2, 3, 4, 5, 6], 3), ([6, 5, 4, 3], 2), ([2, 2, 2], 1)]

    def fisher_of(sequences, batch_size=2, pad_id=0):
        result, _ = estimate.fisher_diagonal(bigram_apply, params,
                                             bigram_batches(sequences, batch_size, pad_id))
        return {key: np.asarray(value) for key, value in result.items()}

    base = fisher_of(sequences)
    new_prompt = [([0, 0, 3, 4, 5, 6], 3), ([1, 5, 4, 3], 2), ([2, 2, 2], 1)]
    for key in base:
        np.testing.assert_array_equal(fisher_of(new_prompt)[key], base[key])
        np.testing.assert_array_equal(fisher_of(sequences, pad_id=5)[key], base[key])
    with_empty = fisher_of([*sequences, ([3, 1, 4, 1, 5], 5)])
    for key in base:
        np.testing.assert_allclose(with_empty[key] * 4, base[key] * 3, rtol=1e-6)
    # Scoring one more token (the last prompt token of the first example) does change F.
    assert not np.allclose(fisher_of([([1, 2, 3, 4, 5, 6], 2), *sequences[1:]])["W"], base["W"])


def test_estimator_rejects_bad_input():
    params = {"W": jnp.zeros((3, 3)), "b": jnp.zeros(3)}
    batches = bigram_batches([([0, 1, 2], 1)], 1)
    with pytest.raises(ConfigError, match="unknown Fisher mode 'diag'"):
        estimate.fisher_diagonal(bigram_apply, params, batches, mode="diag")
    with pytest.raises(ConfigError, match="at least one example"):
        estimate.fisher_diagonal(bigram_apply, params, [])
    with pytest.raises(ConfigError, match="target_mask"):
        estimate.fisher_diagonal(bigram_apply, params, [{"input_ids": np.zeros((1, 3), int)}])


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("content, line, message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"\n', 2, "invalid JSON"),
    ('{"text": "a"}\n\n{"prompt": "a"}\n', 3, 'missing "response"'),
    ('{"response": "b"}\n', 1, 'missing "prompt"'),
    ('{"input": "a"}\n', 1, 'missing "prompt" and "response", or "text"'),
    ('["a", "b"]\n', 1, "expected a JSON object"),
    ('{"text": 3}\n', 1, '"text" must be a string'),
    ('{"text": "a", "prompt": "b", "response": "c"}\n', 1, "both"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as error:
        data.read_jsonl(path)
    assert f"{path}:{line}:" in str(error.value)


def test_jsonl_reading(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"prompt": "p", "response": "r", "id": 7}\n\n{"text": "t"}\n{"text": "u"}')
    assert data.read_jsonl(path) == [data.Example("p", "r"), data.Example(None, "t"),
                                     data.Example(None, "u")]
    assert data.read_jsonl(path, max_examples=2) == data.read_jsonl(path)[:2]
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ConfigError, match="empty.jsonl has no examples"):
        data.read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match="missing.jsonl does not exist"):
        data.read_jsonl(tmp_path / "missing.jsonl")


def test_tokenization_marks_response_tokens(tiny):
    tokenizer = tiny["tokenizer"]
    pair = data.tokenize_example(data.Example("what is two", " five"), tokenizer)
    assert pair.input_ids == (1, 16, 17, 18, 22, 2) and pair.first_target == 4  # BOS .. EOS
    text = data.tokenize_example(data.Example(None, "the cat"), tokenizer)
    assert text.input_ids == (1, 9, 11) and text.first_target == 1
    no_eos = data.tokenize_example(data.Example("red", "blue"), tokenizer, append_eos=False)
    assert no_eos.input_ids == (1, 25, 26) and no_eos.num_targets == 1
    chat = data.tokenize_example(data.Example("red", "blue"), tokenizer, chat_template=True)
    # "<s> user : red </s> <s> assistant :" then "blue </s>"
    assert chat.input_ids == (1, 4, 6, 25, 2, 1, 5, 6, 26, 2) and chat.first_target == 8
    cut = data.tokenize_example(data.Example("the cat sat on", "the mat"), tokenizer,
                                max_length=4)
    assert cut.truncated and cut.input_ids == (1, 9, 11, 13) and cut.num_targets == 0
    with pytest.raises(ConfigError, match="max_length must be at least 2"):
        data.tokenize([], tokenizer, max_length=1)


def test_batches_are_bucketed_and_filled():
    assert [data.bucket_length(n) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]
    assert data.bucket_length(70, max_length=80) == 80
    examples = [data.Tokenized((1, 5, 6, 2), 2), data.Tokenized(tuple(range(1, 21)), 1),
                data.Tokenized((1, 7), 1)]
    first, second = data.make_batches(examples, 2, pad_id=9)
    assert first["input_ids"].shape == (2, 32) and second["input_ids"].shape == (2, 16)
    assert first["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(first["input_ids"][0, :6], [1, 5, 6, 2, 9, 9])
    np.testing.assert_array_equal(first["target_mask"][0, :5], [False, False, True, True, False])
    assert first["target_mask"][1].sum() == 19 and first["attention_mask"][1].sum() == 20
    np.testing.assert_array_equal(second["example_mask"], [True, False])
    np.testing.assert_array_equal(second["attention_mask"][1, :2], [1, 0])  # filler row
    assert not second["target_mask"][1].any()
    assert sorted(data.model_inputs(second)) == ["attention_mask", "input_ids"]
    with pytest.raises(ConfigError, match="batch_size"):
        data.make_batches(examples, 0)


# --------------------------------------------------------------------------- checkpoints


def test_write_fisher_round_trips_and_is_atomic(tiny, library_fisher, tmp_path):
    tensors, stats = library_fisher
    out = estimate.write_fisher(tmp_path / "f32", tensors, {"mode": stats.mode})
    assert read_tensors(out).keys() == tensors.keys()
    for name, value in read_tensors(out).items():
        np.testing.assert_array_equal(value, tensors[name])
    record = json.loads((out / estimate.RECORD_FILE).read_text())
    assert record["mode"] == "per_example" and record["jaxmerge_version"] == jaxmerge.__version__
    half = read_tensors(estimate.write_fisher(tmp_path / "bf16", tensors, dtype="bfloat16"))
    assert all(value.dtype == ml_dtypes.bfloat16 for value in half.values())
    name = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(half[name].astype(np.float32), tensors[name], rtol=2**-8)
    with pytest.raises(ConfigError, match="--overwrite"):
        estimate.write_fisher(out, tensors)
    assert not list(tmp_path.glob(".*"))  # no staging directory left behind


def test_tied_checkpoint_storing_lm_head_gets_the_embedding_fisher(tiny, library_fisher,
                                                                   tmp_path):
    """Some tied checkpoints also store lm_head.weight: the Fisher has every stored name."""
    from safetensors.numpy import save_file

    stored = read_tensors(tiny["dir"])
    stored["lm_head.weight"] = stored["model.embed_tokens.weight"]
    save_file(stored, str(tmp_path / "model.safetensors"))
    for path in tiny["dir"].iterdir():
        if path.name != "model.safetensors":
            (tmp_path / path.name).write_bytes(path.read_bytes())
    tensors, _ = estimate.fisher_for_checkpoint(tmp_path, tiny["data"], batch_size=2,
                                                max_length=32)
    assert tensors.keys() == stored.keys()
    embedding = library_fisher[0]["model.embed_tokens.weight"]
    np.testing.assert_allclose(tensors["lm_head.weight"], embedding, rtol=1e-6)


def fisher_weighted():
    """θ = Σ F̃_t θ_t / Σ F̃_t with F̃ = F + 1e-6 (Matena & Raffel) on the merge algebra."""

    def apply(taus, ctx):
        weights = ctx.extras["fisher"] + 1e-6
        return jnp.sum(weights * taus, axis=0) / jnp.sum(weights, axis=0)

    return jaxmerge.Merge(apply, extra_inputs=("fisher",))


def run_fisher_cli(*args):
    return run_module("jaxmerge.fisher", *args)


def test_cli_writes_a_fisher_checkpoint_that_streams_in_a_merge(tiny, library_fisher, tmp_path):
    out = tmp_path / "fisher"
    result = run_fisher_cli(f"--model={tiny['dir']}", f"--data={tiny['data']}",
                            f"--output={out}", "--batch_size=2", "--max_length=32")
    assert result.returncode == 0, result.stderr
    assert "5 examples" in result.stdout
    written = read_tensors(out)
    model = read_tensors(tiny["dir"])
    assert list(written) == list(model)
    assert all(written[n].shape == model[n].shape and written[n].dtype == np.float32
               for n in model)
    tensors, stats = library_fisher
    assert max_rel_diff(written, tensors) < 1e-5  # optimised XLA in the subprocess
    record = json.loads((out / estimate.RECORD_FILE).read_text())
    assert record["num_examples"] == 5 and record["num_tokens"] == stats.num_tokens
    assert record["mode"] == "per_example"
    assert pathlib.Path(record["data"]) == pathlib.Path(tiny["data"]).resolve()

    again = run_fisher_cli(f"--model={tiny['dir']}", f"--data={tiny['data']}",
                           f"--output={out}")
    assert again.returncode == 2 and "--overwrite" in again.stderr

    # Two "experts" (the model and a shifted copy) merged with Fisher weights read from disk.
    from safetensors.numpy import save_file

    expert = tmp_path / "expert"
    expert.mkdir()
    save_file({n: v + 0.01 for n, v in model.items()}, str(expert / "model.safetensors"))
    (expert / "config.json").write_bytes((tiny["dir"] / "config.json").read_bytes())
    other = estimate.write_fisher(tmp_path / "fisher-2",
                                  {n: v[::-1].copy() for n, v in tensors.items()})
    jaxmerge.merge_checkpoints(fisher_weighted(), tiny["dir"], [tiny["dir"], expert],
                               tmp_path / "merged", extras={"fisher": [out, other]})
    merged = read_tensors(tmp_path / "merged")
    for name, theta in model.items():
        f1 = written[name].astype(np.float64) + 1e-6
        f2 = tensors[name][::-1].astype(np.float64) + 1e-6
        expected = (f1 * theta + f2 * (theta + np.float32(0.01))) / (f1 + f2)
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_cli_errors_and_help(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"prompt": "the"}\n')
    result = run_fisher_cli(f"--model={tiny['dir']}", f"--data={bad}",
                            f"--output={tmp_path / 'out'}")
    assert result.returncode == 2 and f"{bad}:2" in result.stderr
    assert 'missing "response"' in result.stderr and not (tmp_path / "out").exists()
    missing = run_fisher_cli(f"--data={bad}")
    assert missing.returncode == 2 and "--model, --output required" in missing.stderr
    usage = run_fisher_cli("--help")
    assert "Traceback" not in usage.stderr  # absl exits 1 after --help
    for text in ("per_example", "per_batch", "RESPONSE tokens", "--batch_size",
                 "--[no]overwrite", "--[no]chat_template", "--dtype"):
        assert text in usage.stdout, text


# --------------------------------------------------------------------------- SmolLM2-135M


SMOLLM2_LINES = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5."},
    {"prompt": "Name a primary colour.", "response": "Red."},
    {"prompt": "Translate 'cat' into French.", "response": "Chat."},
    {"prompt": "Is the sky blue?", "response": "Yes, on a clear day."},
    {"text": "The quick brown fox jumps over the lazy dog."},
]


@pytest.mark.smollm2
def test_smollm2_fisher_cli(smollm2, tmp_path):
    expert = smollm2["experts"][0]
    data_file = write_jsonl(tmp_path / "val.jsonl", SMOLLM2_LINES)
    out = tmp_path / "fisher"
    result = run_fisher_cli(f"--model={expert}", f"--data={data_file}", f"--output={out}",
                            "--batch_size=2", "--max_length=64", "--chat_template")
    assert result.returncode == 0, result.stderr
    record = json.loads((out / estimate.RECORD_FILE).read_text())
    print(f"SmolLM2-135M Fisher: {record['num_examples']} examples, {record['num_tokens']} "
          f"tokens, {record['seconds']:.1f} s ({result.stdout.strip()})")
    with Checkpoint.open(expert) as checkpoint:
        shapes = {name: entry.shape for name, entry in checkpoint.tensors.items()}
    written = read_tensors(out)
    assert list(written) == list(shapes)
    assert all(written[name].shape == tuple(shape) for name, shape in shapes.items())
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in written.values())
    matrices = [name for name, v in written.items() if v.ndim == 2]
    nonzero = [name for name in matrices
               if np.count_nonzero(written[name]) > 0.5 * written[name].size]
    assert len(nonzero) >= 0.9 * len(matrices), sorted(set(matrices) - set(nonzero))[:5]
    assert record["num_examples"] == 6 and record["chat_template"] is True


# ---------------------------------------------------------------- merge --validation_data


def run_merge_cli(*args):
    return run_module("jaxmerge.main", *args, timeout=900)


def shifted_expert(model_dir, directory, seed) -> pathlib.Path:
    """A copy of ``model_dir``'s weights plus sparse noise, without tokenizer files."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, value in read_tensors(model_dir).items():
        mask = rng.random(value.shape) < 0.3
        tensors[name] = (value + mask * rng.normal(0, 0.02, value.shape)).astype(value.dtype)
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    return directory


def test_merge_with_validation_data_equals_merge_with_precomputed_fisher(tiny, tmp_path):
    """--validation_data computes each expert's Fisher (tokenizer from the expert, else the
    base) exactly as python -m jaxmerge.fisher does, then merges as --fisher would."""
    experts = [shifted_expert(tiny["dir"], tmp_path / f"expert-{i}", seed=i) for i in range(2)]
    settings = ["--batch_size=2", "--max_length=32", "--mode=per_batch"]
    fishers = []
    for i, expert in enumerate(experts):
        fishers.append(tmp_path / f"fisher-{i}")
        result = run_fisher_cli(f"--model={expert}", f"--tokenizer={tiny['dir']}",
                                f"--data={tiny['data']}", f"--output={fishers[-1]}", *settings)
        assert result.returncode == 0, result.stderr
    common = ["--method=sar", f"--base={tiny['dir']}",
              "--experts=" + ",".join(map(str, experts)), "--dtype=float32"]
    given = run_merge_cli(*common, f"--output={tmp_path / 'given'}",
                          "--fisher=" + ",".join(map(str, fishers)))
    assert given.returncode == 0, given.stderr
    computed = run_merge_cli(*common, f"--output={tmp_path / 'computed'}",
                             f"--validation_data={tiny['data']}", "--fisher_batch_size=2",
                             "--fisher_max_length=32", "--fisher_mode=per_batch")
    assert computed.returncode == 0, computed.stderr
    assert "Fisher 2/2" in computed.stderr
    expected, got = read_tensors(tmp_path / "given"), read_tensors(tmp_path / "computed")
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    record = json.loads((tmp_path / "computed" / "jaxmerge_config.json").read_text())
    assert record["hyperparameters"]["validation_data"] == [tiny["data"]]
    assert record["hyperparameters"]["fisher_mode"] == "per_batch"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == []  # the scratch Fishers are gone

    # The Fisher decides the conflicts: swapping the files swaps the winners.
    swapped = run_merge_cli(*common, f"--output={tmp_path / 'swapped'}",
                            "--fisher=" + ",".join(map(str, fishers[::-1])))
    assert swapped.returncode == 0, swapped.stderr
    assert any(not np.array_equal(value, read_tensors(tmp_path / "swapped")[name])
               for name, value in expected.items())


def test_merge_validation_data_errors_compute_nothing(tiny, tmp_path):
    experts = [shifted_expert(tiny["dir"], tmp_path / f"expert-{i}", seed=i) for i in range(2)]
    common = ["--method=sar", f"--base={tiny['dir']}",
              "--experts=" + ",".join(map(str, experts)), f"--output={tmp_path / 'out'}"]
    cases = [
        ([f"--validation_data={tmp_path / 'none.jsonl'}"], "none.jsonl does not exist"),
        ([f"--validation_data={tiny['data']},{tiny['data']},{tiny['data']}"],
         "lists 3 files for 2 experts"),
        ([f"--validation_data={tiny['data']}", f"--fisher={tiny['dir']},{tiny['dir']}"],
         "not both"),
        ([], "--validation_data=FILE.jsonl"),
    ]
    for args, message in cases:
        result = run_merge_cli(*common, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    (tmp_path / "out").mkdir()
    exists = run_merge_cli(*common, f"--validation_data={tiny['data']}")
    assert exists.returncode == 2 and "--overwrite" in exists.stderr
    assert "Fisher 1/2" not in exists.stderr  # refused before any Fisher is computed
    linear = run_merge_cli("--method=linear", *common[1:], f"--validation_data={tiny['data']}")
    assert linear.returncode == 2 and "only read by methods" in linear.stderr


@pytest.mark.smollm2
def test_smollm2_sar_with_validation_data(smollm2, tmp_path):
    """SAR on SmolLM2-135M with 2 derived experts, Fishers computed from --validation_data.

    The Fishers are scratch files, so the merge is checked against SAR's structure (METHODS.md
    §6) entry by entry: agreeing deltas summed, each conflict given to one expert, private
    entries above the median kept, below it dropped with p = 0.2 or kept × 1/(1 − p).
    """
    base, experts = smollm2["base"], smollm2["experts"][:2]
    data_file = write_jsonl(tmp_path / "val.jsonl", SMOLLM2_LINES)
    out = tmp_path / "merged"
    result = run_merge_cli("--method=sar", f"--base={base}", f"--experts={experts[0]},{experts[1]}",
                           f"--output={out}", f"--validation_data={data_file}", "--dtype=float32",
                           "--fisher_batch_size=2", "--fisher_max_length=64", "--chat_template")
    assert result.returncode == 0, result.stderr

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    merged, theta0 = read_tensors(out), read_tensors(base)
    taus = [{n: v.astype(np.float64) - theta0[n].astype(np.float64)
             for n, v in read_tensors(e).items()} for e in experts]
    counts = dict.fromkeys(("conflict_to_1", "conflict_to_2", "low_private", "dropped",
                            "rescaled"), 0)
    for name, t0 in theta0.items():
        t0 = t0.astype(np.float64)
        tau1, tau2 = taus[0][name], taus[1][name]
        delta = merged[name].astype(np.float64) - t0
        tol = 4 * np.finfo(np.float32).eps * np.maximum(np.abs(t0), np.abs(delta + t0)) + 1e-12
        def close(a, b, tol=tol):
            return np.abs(a - b) <= tol

        conflict = tau1 * tau2 < 0
        summed = np.where(conflict, 0.0, tau1 + tau2)
        active = (np.abs(tau1) > 1e-5).astype(int) + (np.abs(tau2) > 1e-5)
        private = (active == 1) & ~conflict
        assert close(delta, summed)[~conflict & ~private].all(), name
        to1, to2 = close(delta, tau1) & conflict, close(delta, tau2) & conflict
        assert (to1 | to2)[conflict].all(), name
        counts["conflict_to_1"] += int((to1 & ~to2).sum())
        counts["conflict_to_2"] += int((to2 & ~to1).sum())
        if private.any():
            median = np.median(np.abs(summed[private]))
            low = private & (np.abs(summed) < median)
            assert close(delta, summed)[private & ~low].all(), name
            dropped, rescaled = close(delta, 0.0) & low, close(delta, summed / 0.8) & low
            assert (dropped | rescaled)[low].all(), name
            counts["low_private"] += int(low.sum())
            counts["dropped"] += int(dropped.sum())
            counts["rescaled"] += int(rescaled.sum())
    print(f"SmolLM2 SAR --validation_data: {counts}")
    assert counts["conflict_to_1"] > 0 and counts["conflict_to_2"] > 0  # the Fisher decides
    rate = counts["dropped"] / counts["low_private"]
    assert abs(rate - 0.2) < 5 * np.sqrt(0.2 * 0.8 / counts["low_private"]), rate


def test_a_second_expert_of_the_same_architecture_compiles_nothing(tiny, tmp_path):
    other, _ = make_tiny_model("qwen3", tmp_path / "other", seed=4, tie_word_embeddings=True)
    apply_a, params_a = models.functional(models.load_model(tiny["dir"]))
    apply_b, params_b = models.functional(models.load_model(other))
    assert apply_a == apply_b and hash(apply_a) == hash(apply_b)
    batches = data.make_batches(hand_examples(), 2, max_length=16)
    estimate.fisher_diagonal(apply_a, params_a, batches, mode="per_batch")
    compiled = estimate._accumulate_step.cache_info().misses
    fisher_b, _ = estimate.fisher_diagonal(apply_b, params_b, batches, mode="per_batch")
    assert estimate._accumulate_step.cache_info().misses == compiled
    fisher_a, _ = estimate.fisher_diagonal(apply_a, params_a, batches, mode="per_batch")
    assert max_rel_diff(flat(fisher_b), flat(fisher_a)) > 0.01  # really the other model's
