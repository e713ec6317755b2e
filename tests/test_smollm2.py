"""Integration: merge the real SmolLM2-135M-Instruct with 3 derived experts from the CLI.

Every output tensor must equal the float64 NumPy reference merge (up to one bf16
rounding step), and the merged model must load in transformers and generate.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests import numpy_reference as ref
from tests.subprocesses import subprocess_env
from tests.test_cli import read_native

pytestmark = pytest.mark.smollm2
BF16_ULP = 2.0**-7


def run_merge(smollm2, output, *args):
    experts = ",".join(str(e) for e in smollm2["experts"])
    command = [sys.executable, "-m", "jaxmerge.main", f"--base={smollm2['base']}",
               f"--experts={experts}", f"--output={output}", "--progress=false", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(),
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def inputs(smollm2):
    return read_native(smollm2["base"]), [read_native(e) for e in smollm2["experts"]]


@pytest.mark.parametrize("method,args,per_tensor", [
    ("task_arithmetic", [], ref.task_arithmetic),
    ("ties", ["--density=0.2", "--ties_scope=per_tensor"], lambda t: ref.ties(t, density=0.2)),
    ("ram", [], ref.ram),
])
def test_smollm2_merge_equals_reference(smollm2, inputs, tmp_path, method, args, per_tensor):
    out = tmp_path / method
    run_merge(smollm2, out, f"--method={method}", *args)
    base, experts = inputs
    merged = read_native(out)
    assert set(merged) == set(base)  # tied lm_head stays implicit, as in the base
    entries = differing = 0
    for name, value in base.items():
        b = value.astype(np.float64)
        taus = np.stack([e[name].astype(np.float64) - b for e in experts])
        expected = b + per_tensor(taus)
        got = merged[name]
        assert got.dtype == value.dtype
        # One bf16 rounding step: float32 vs float64 arithmetic may round to either neighbour.
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=BF16_ULP, atol=1e-30,
                                   err_msg=name)
        entries += got.size
        differing += int(np.sum(got != expected.astype(got.dtype)))
    print(f"{method}: {differing} of {entries} entries differ from the bf16-rounded float64 "
          f"reference (all by at most one bf16 step)")
    assert differing <= entries * 1e-4


def test_smollm2_merged_model_loads_and_generates(smollm2, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "dare_ties"
    run_merge(smollm2, out, "--method=dare_ties", "--seed=0")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    text = tokenizer.decode(generated[0, ids.shape[1]:])
    assert len(text.strip()) > 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "chat_template.jinja").exists() or tokenizer.chat_template


def test_smollm2_resmerge_matches_reference_loads_and_generates(smollm2, inputs, tmp_path):
    """ResMerge (randomised top-1 SVD) on the real model: loads, generates, and matches the
    float64 full-SVD reference on two whole layers and every non-matrix tensor."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxmerge.leaves import LeafInfo

    out = tmp_path / "resmerge"
    run_merge(smollm2, out, "--method=resmerge")
    base, experts = inputs
    merged = read_native(out)
    assert set(merged) == set(base)
    worst = 0.0
    for name, value in base.items():
        info = LeafInfo.from_name(name, value.shape, value.dtype)
        if info.is_matrix and info.layer not in (0, 29):
            continue
        b = value.astype(np.float64)
        taus = np.stack([e[name].astype(np.float64) - b for e in experts])
        delta = (ref.resmerge(taus, family=info.family) if info.is_matrix
                 else ref.resmerge_nonmatrix(taus))
        got = merged[name].astype(np.float64)
        # One bf16 step, plus, where θ₀ + Δ nearly cancels, the randomised top-k SVD's
        # error (its convergence tolerance is 1e-4 of the head, so of max |Δ|).
        np.testing.assert_allclose(got, b + delta, rtol=BF16_ULP,
                                   atol=1e-4 * np.abs(delta).max(), err_msg=name)
        # Relative error of the merged task vector, beyond the bf16 rounding of the output:
        # |got - expected| is at most half a bf16 step of the weight, plus the float32 error.
        excess = np.maximum(np.abs(got - (b + delta)) - np.abs(b + delta) * 2.0**-8, 0.0)
        worst = max(worst, float(np.linalg.norm(excess) / max(np.linalg.norm(delta), 1e-30)))
    print(f"resmerge: worst per-tensor relative error beyond bf16 rounding {worst:.2e}")
    assert worst <= 1e-3

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert len(tokenizer.decode(generated[0, ids.shape[1]:]).strip()) > 0
    record = json.loads((out / "jaxmerge_config.json").read_text())
    assert record["method"] == "resmerge" and record["hyperparameters"]["head_rank"] == 1
