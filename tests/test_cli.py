"""End-to-end command-line tests on tiny random Llama checkpoints.

Outputs must load in transformers and equal the float64 NumPy reference merge;
the file path must equal the in-memory library path bit for bit; bad input must
fail with one readable message and leave nothing behind.
"""

import json
import pathlib
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from absl import flags
from absl.testing import flagsaver

import jaxmerge
from jaxmerge import main as cli_main
from jaxmerge import methods
from jaxmerge.io import Checkpoint, load_orbax
from jaxmerge.leaves import module_family
from tests import numpy_reference as ref
from tests.checkpoints import make_tiny_expert, make_tiny_llama
from tests.subprocesses import run_module

FLAGS = flags.FLAGS


def read_native(directory) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint in its stored dtype."""
    with Checkpoint.open(directory) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.tensors}


def write_checkpoint(directory, tensors: dict, config_from=None) -> pathlib.Path:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    if config_from is not None:
        shutil.copy(pathlib.Path(config_from) / "config.json", directory / "config.json")
    return directory


def variant(source, directory, change):
    """A copy of checkpoint ``source`` with ``change(tensors)`` applied to its tensors."""
    tensors = read_native(source)
    change(tensors)
    return write_checkpoint(directory, tensors, config_from=source)


def run_cli(*args) -> int:
    """Runs the CLI in-process with fresh flags (restored afterwards)."""
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["jaxmerge", "--progress=false", "--compilation_cache=", *args])
        return cli_main.main(["jaxmerge"])


def experts_flag(experts):
    return "--experts=" + ",".join(str(e) for e in experts)


def reference_merge(base_dir, expert_dirs, per_tensor):
    """θ₀ + Δ in float64 for every tensor, Δ from ``per_tensor(taus)``."""
    return spectral_reference(base_dir, expert_dirs, lambda taus, family: per_tensor(taus),
                              per_tensor)


def assert_close_to_reference(output_dir, expected, rtol):
    out = read_native(output_dir)
    assert set(out) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(out[name].astype(np.float64), value, rtol=rtol, atol=1e-7,
                                   err_msg=name)


BF16_ULP = 2.0**-7  # relative spacing of bfloat16: a float32 vs float64 double rounding may differ


@pytest.mark.parametrize("method,args,per_tensor", [
    ("task_arithmetic", ["--scale=0.8"], lambda t: ref.task_arithmetic(t, scale=0.8)),
    ("ties", ["--density=0.3"], lambda t: ref.ties(t, density=0.3)),
    ("ram", [], lambda t: ref.ram(t)),
    ("linear", ["--weights=1,2,3"], lambda t: ref.linear(t, weights=[1, 2, 3])),
    ("breadcrumbs", ["--density=0.5", "--gamma=0.05"],
     lambda t: ref.breadcrumbs(t, density=0.5, gamma=0.05)),
])
def test_cli_matches_numpy_reference_and_loads(tiny, tmp_path, method, args, per_tensor):
    base, experts = tiny
    out = tmp_path / "merged"
    assert run_cli(f"--method={method}", f"--base={base}", experts_flag(experts),
                   f"--output={out}", *args) == 0
    assert_close_to_reference(out, reference_merge(base, experts, per_tensor), rtol=BF16_ULP)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    state = read_native(out)
    np.testing.assert_array_equal(
        model.model.layers[0].mlp.up_proj.weight.detach().float().numpy(),
        state["model.layers.0.mlp.up_proj.weight"].astype(np.float32))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    record = json.loads((out / "jaxmerge_config.json").read_text())
    assert record["method"] == method and record["experts"] == [str(e) for e in experts]
    card = (out / "README.md").read_text()
    assert "jaxmerge" in card and str(base) in card and method in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging left


def fisher_like(base, directory, seed) -> pathlib.Path:
    """A Fisher checkpoint for ``base``: positive float32 values, the base's tensor names."""
    rng = np.random.default_rng(seed)
    tensors = {name: rng.gamma(0.5, 1e-3, value.shape).astype(np.float32)
               for name, value in read_native(base).items()}
    return write_checkpoint(directory, tensors)


@pytest.mark.parametrize("method", list(methods.REGISTRY))
def test_cli_equals_library_merge(tiny, tmp_path, method):
    base, experts = tiny
    experts = experts[:2] if method == "slerp" else experts
    out = tmp_path / "merged"
    merge = methods.build(method, {})
    fisher_args, extras = [], None
    if "fisher" in merge.extra_inputs:
        fishers = [fisher_like(base, tmp_path / f"fisher-{i}", seed=i) for i in range(len(experts))]
        fisher_args = ["--fisher=" + ",".join(str(f) for f in fishers)]
        extras = {"fisher": [read_native(f) for f in fishers]}
    assert run_cli(f"--method={method}", f"--base={base}", experts_flag(experts),
                   f"--output={out}", "--seed=5", *fisher_args) == 0
    library = jaxmerge.merge(merge, read_native(base), [read_native(e) for e in experts], key=5,
                             extras=extras)
    files = read_native(out)
    for name, value in library.items():
        np.testing.assert_array_equal(np.asarray(value), files[name], err_msg=name)


def test_sharded_float32_output_and_sharded_input(tiny, tmp_path):
    base32 = make_tiny_llama(tmp_path / "base32", seed=3, dtype="float32", max_shard_size="30KB")
    experts = [make_tiny_expert(base32, tmp_path / f"e{i}", seed=10 + i) for i in range(2)]
    assert (base32 / "model.safetensors.index.json").exists()
    out = tmp_path / "merged"
    assert run_cli("--method=ties", f"--base={base32}", experts_flag(experts), f"--output={out}",
                   "--max_shard_size=25KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    for shard in shards:
        assert (out / shard).stat().st_size <= 25_000 + 4096
    assert_close_to_reference(out, reference_merge(base32, experts, ref.ties), rtol=2e-6)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_dtype_flag_and_orbax_format(tiny, tmp_path):
    base, experts = tiny
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("--method=ram_plus", f"--base={base}", experts_flag(experts), f"--output={a}",
                   "--dtype=float32") == 0
    assert all(v.dtype == np.float32 for v in read_native(a).values())
    assert json.loads((a / "config.json").read_text())["dtype"] == "float32"
    assert run_cli("--method=ram_plus", f"--base={base}", experts_flag(experts), f"--output={b}",
                   "--dtype=float32", "--format=orbax") == 0
    restored = load_orbax(b / "params")
    expected = read_native(a)
    assert set(restored) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(restored[name]), value)
    assert (b / "config.json").exists() and (b / "jaxmerge_config.json").exists()


def test_recipe_file(tiny, tmp_path):
    base, experts = tiny
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        "import jaxmerge\nfrom jaxmerge import ops\n"
        "merge = jaxmerge.route({jaxmerge.family('attention'): jaxmerge.ties(0.3)},\n"
        "                       default=jaxmerge.chain(ops.active(1e-5), ops.disjoint_mean()))\n")
    out, ties_out, ram_out = tmp_path / "r", tmp_path / "t", tmp_path / "m"
    assert run_cli(f"--recipe={recipe}", f"--base={base}", experts_flag(experts),
                   f"--output={out}") == 0
    assert run_cli("--method=ties", "--density=0.3", f"--base={base}", experts_flag(experts),
                   f"--output={ties_out}") == 0
    assert run_cli("--method=ram", f"--base={base}", experts_flag(experts),
                   f"--output={ram_out}") == 0
    merged, ties_result, ram_result = read_native(out), read_native(ties_out), read_native(ram_out)
    for name, value in merged.items():
        # METHODS.md §0: first match wins, so post_attention_layernorm is "attention" too.
        expected = ties_result if module_family(name) == "attention" else ram_result
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert json.loads((out / "jaxmerge_config.json").read_text())["method"].startswith("recipe:")


def test_tied_lm_head_is_merged_once_and_retied(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=4, tie_word_embeddings=True)
    experts = [make_tiny_expert(base, tmp_path / f"e{i}", seed=20 + i) for i in range(2)]

    def add_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()

    base2 = variant(base, tmp_path / "base2", add_head)
    experts2 = [variant(e, tmp_path / f"f{i}", add_head) for i, e in enumerate(experts)]
    out = tmp_path / "merged"
    assert run_cli("--method=ram_plus", f"--base={base2}", experts_flag(experts2),
                   f"--output={out}") == 0
    merged = read_native(out)
    np.testing.assert_array_equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    # Same merge without the duplicate head: identical tensors (ρ counts the embedding once).
    out_plain = tmp_path / "plain"
    assert run_cli("--method=ram_plus", f"--base={base}", experts_flag(experts),
                   f"--output={out_plain}") == 0
    plain = read_native(out_plain)
    for name, value in plain.items():
        np.testing.assert_array_equal(merged[name], value, err_msg=name)


def test_vocabulary_mismatch_merges_common_rows(tiny, tmp_path, capsys):
    base, experts = tiny
    rng = np.random.default_rng(0)
    extra = {}

    def grow(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = rng.normal(size=(2, tensors[name].shape[1])).astype(ml_dtypes.bfloat16)
            extra[name] = rows
            tensors[name] = np.concatenate([tensors[name], rows])

    grown = variant(experts[0], tmp_path / "grown", grow)
    out = tmp_path / "merged"
    assert run_cli("--method=task_arithmetic", f"--base={base}",
                   experts_flag([grown, *experts[1:]]), f"--output={out}") == 0
    assert "vocabulary sizes differ" in capsys.readouterr().err
    merged, common = read_native(out), read_native(tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 66
    expected = reference_merge(base, experts, ref.task_arithmetic)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape[0] == 66
        np.testing.assert_array_equal(merged[name][64:], extra[name])
        np.testing.assert_allclose(common[name][:64].astype(np.float64), expected[name],
                                   rtol=BF16_ULP, atol=1e-7)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 66


def test_deterministic_across_runs_and_batching(tiny, tmp_path):
    base, experts = tiny
    common = ["--method=dare_ties", f"--base={base}", experts_flag(experts)]
    assert run_cli(*common, f"--output={tmp_path / 'a'}", "--seed=1") == 0
    assert run_cli(*common, f"--output={tmp_path / 'b'}", "--seed=1",
                   "--chunk_memory=1KB") == 0
    assert run_cli(*common, f"--output={tmp_path / 'c'}", "--seed=2") == 0
    a, b, c = (read_native(tmp_path / x) for x in "abc")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any(not np.array_equal(a[n], c[n]) for n in a if "proj" in n)
    first = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert first == (tmp_path / "b" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------
# Bad input: one readable message, non-zero exit, nothing written.


def expect_error(capsys, tmp_path, *args, contains=()):
    out = tmp_path / "never"
    capsys.readouterr()  # drop what building the inputs printed
    code = run_cli(*args, f"--output={out}")
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in contains:
        assert str(text) in err, (text, err)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "jaxmerge-tmp" in p.name]
    return err


def test_missing_base_directory(tiny, tmp_path, capsys):
    _, experts = tiny
    expect_error(capsys, tmp_path, "--method=ties", f"--base={tmp_path / 'nope'}",
                 experts_flag(experts), contains=["nope", "does not exist"])


def test_missing_shard(tmp_path, capsys):
    base = make_tiny_llama(tmp_path / "base", seed=3, max_shard_size="30KB")
    expert = tmp_path / "expert"
    shutil.copytree(base, expert)
    shard = sorted(expert.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(capsys, tmp_path, "--method=ties", f"--base={base}", f"--experts={expert}",
                 contains=[shard.name])


def test_corrupt_shard_header(tiny, tmp_path, capsys):
    base, experts = tiny
    broken = tmp_path / "broken"
    shutil.copytree(experts[0], broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    expect_error(capsys, tmp_path, "--method=ties", f"--base={base}", f"--experts={broken}",
                 contains=["model.safetensors"])


def test_expert_missing_and_extra_tensors(tiny, tmp_path, capsys):
    base, experts = tiny
    name = "model.layers.1.mlp.down_proj.weight"
    missing = variant(experts[0], tmp_path / "missing", lambda t: t.pop(name))
    expect_error(capsys, tmp_path, "--method=ties", f"--base={base}", f"--experts={missing}",
                 contains=[name, "missing", missing])
    extra = variant(experts[0], tmp_path / "extra",
                    lambda t: t.__setitem__("model.surprise.weight", np.zeros(3, np.float32)))
    expect_error(capsys, tmp_path, "--method=ties", f"--base={base}", f"--experts={extra}",
                 contains=["model.surprise.weight", extra])


def test_shape_and_dtype_mismatch(tiny, tmp_path, capsys):
    base, experts = tiny
    name = "model.layers.0.self_attn.q_proj.weight"
    reshaped = variant(experts[0], tmp_path / "reshaped",
                       lambda t: t.__setitem__(name, t[name][:-1]))
    expect_error(capsys, tmp_path, "--method=ties", f"--base={base}", f"--experts={reshaped}",
                 contains=[name, "shape", reshaped / "model.safetensors"])
    recast = variant(experts[0], tmp_path / "recast",
                     lambda t: t.__setitem__(name, t[name].astype(np.float32)))
    expect_error(capsys, tmp_path, "--method=ties", f"--base={base}", f"--experts={recast}",
                 contains=[name, "dtype", "float32", "bfloat16"])


def test_non_finite_input(tiny, tmp_path, capsys):
    base, experts = tiny
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name][0, 0] = np.nan

    bad = variant(experts[1], tmp_path / "nan", poison)
    expect_error(capsys, tmp_path, "--method=task_arithmetic", f"--base={base}",
                 experts_flag([experts[0], bad]), contains=[name, bad / "model.safetensors",
                                                             "NaN"])


@pytest.mark.parametrize("args,contains", [
    (["--method=slerp"], ["slerp", "3 experts"]),
    (["--method=ties", "--density=1.5"], ["density", "1.5"]),
    (["--method=dare_ties", "--drop_rate=-0.1"], ["drop_rate"]),
    (["--method=della", "--della_epsilon=0.3"], ["epsilon"]),
    (["--method=linear", "--weights=1,2"], ["2 weights", "3 experts"]),
    (["--method=ties", "--weights=1,2,3"], ["--weights"]),
    (["--method=ties", "--max_shard_size=lots"], ["max_shard_size"]),
    (["--method=tsv", "--compute_threads=0"], ["compute threads", "got 0"]),
])
def test_bad_hyperparameters(tiny, tmp_path, capsys, args, contains):
    base, experts = tiny
    expect_error(capsys, tmp_path, *args, f"--base={base}", experts_flag(experts),
                 contains=contains)


def test_no_experts_and_no_method(tiny, tmp_path, capsys):
    base, _ = tiny
    expect_error(capsys, tmp_path, "--method=ties", f"--base={base}", "--experts=",
                 contains=["--experts"])
    expect_error(capsys, tmp_path, f"--base={base}", f"--experts={base}", contains=["--method"])


def test_recipe_without_merge(tiny, tmp_path, capsys):
    base, experts = tiny
    recipe = tmp_path / "bad.py"
    recipe.write_text("x = 1\n")
    expect_error(capsys, tmp_path, f"--recipe={recipe}", f"--base={base}",
                 experts_flag(experts), contains=["merge", str(recipe)])


def test_existing_output_needs_overwrite(tiny, tmp_path, capsys):
    base, experts = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = run_cli("--method=ties", f"--base={base}", experts_flag(experts), f"--output={out}")
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert run_cli("--method=ties", f"--base={base}", experts_flag(experts), f"--output={out}",
                   "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_subprocess_error_has_no_traceback_and_help_lists_flags(tiny, tmp_path):
    base, experts = tiny
    result = run_module("jaxmerge.main", "--method=slerp", f"--base={base}",
                        experts_flag(experts), f"--output={tmp_path / 'x'}", timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "slerp" in result.stderr
    assert not (tmp_path / "x").exists()
    help_text = run_module("jaxmerge.main", "--help", timeout=300).stdout
    for name in methods.REGISTRY:
        assert name in help_text
    for flag in ("--density", "--drop_rate", "--ram_alpha", "--max_shard_size", "--recipe",
                 "--[no]overwrite", "--[no]demo"):
        assert flag in help_text
    assert "(default: '0.2')" in help_text  # density's METHODS.md default


def test_subprocess_run_ends_with_everything_written(tiny, tmp_path):
    """The command line ends its process without the interpreter's teardown
    (``cli_support.run_program``): what it printed, wrote and cached must all be there."""
    base, experts = tiny
    cache = tmp_path / "xla"
    runs = []
    for name in ("first", "second"):
        result = run_module("jaxmerge.main", "--method=ties", f"--base={base}",
                            experts_flag(experts), f"--output={tmp_path / name}",
                            f"--compilation_cache={cache}", timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.rstrip().endswith(
            f"from_pretrained({str(tmp_path / name)!r})"), result.stdout
        runs.append(read_native(tmp_path / name))
        assert any(cache.iterdir())  # the compiled programs reached the cache
        assert any((cache / "jaxmerge-programs").glob("*.jaxexport"))  # and the traced ones
    first, second = runs
    base_tensors = read_native(base)
    assert set(first) == set(second) == set(base_tensors)
    for name, value in first.items():
        assert value.shape == base_tensors[name].shape, name
        assert value.tobytes() == second[name].tobytes(), name  # compiled == from the cache
    assert json.loads((tmp_path / "second" / "jaxmerge_config.json").read_text())[
        "method"] == "ties"


def test_command_lines_keep_freed_memory_and_quiet_the_collector():
    """``run_program``'s process settings, checked in a fresh interpreter (they are
    process-wide): glibc keeps freed blocks below 1 GiB; gc skips what was imported."""
    import subprocess
    import sys

    from tests.subprocesses import ROOT, subprocess_env

    script = (
        "import gc, sys\n"
        "from jaxmerge import cli_support\n"
        "before = gc.get_threshold()[0]\n"
        "print(cli_support.retain_freed_memory())\n"
        "cli_support.quiet_garbage_collector()\n"
        "print(gc.get_freeze_count() > 1000, gc.get_threshold()[0] == 10 * before)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, env=subprocess_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    retained, quiet = result.stdout.splitlines()
    assert retained == str(sys.platform.startswith("linux"))  # glibc here
    assert quiet == "True True"


def test_program_cache_is_named_by_method_and_hyperparameters(tmp_path):
    """The traced-program cache sits in the compilation cache; its identity is the method
    with every hyperparameter, and a recipe (code the CLI cannot name) gets none."""

    def cache_for(*args):
        with flagsaver.flagsaver():
            FLAGS.unparse_flags()
            FLAGS(["jaxmerge", *args])
            name = cli_main._METHOD.value
            hyper = cli_main.hyperparameters(name) if name else {}
            return cli_main._program_cache(name, hyper)

    cache = tmp_path / "xla"
    ties = cache_for("--method=ties", f"--compilation_cache={cache}")
    assert ties.directory == cache / "jaxmerge-programs"
    assert ties.identity == cache_for("--method=ties", f"--compilation_cache={cache}").identity
    assert ties.identity != cache_for("--method=ties", "--density=0.3",
                                      f"--compilation_cache={cache}").identity
    assert ties.identity != cache_for("--method=dare_ties",
                                      f"--compilation_cache={cache}").identity
    assert cache_for("--method=ties", "--compilation_cache=") is None
    recipe = tmp_path / "recipe.py"
    recipe.write_text("import jaxmerge\nmerge = jaxmerge.ties()\n")
    assert cache_for(f"--recipe={recipe}", f"--compilation_cache={cache}") is None


def test_flag_defaults_are_the_method_defaults():
    import inspect

    for name, spec in methods.REGISTRY.items():
        signature = inspect.signature(spec.factory)
        for flag, parameter in spec.flags.items():
            default = signature.parameters[parameter].default
            assert FLAGS[flag].default == default, (name, flag)


# ---------------------------------------------------------------------------------------------
# Spectral methods (METHODS.md §3, §4)

REPO = pathlib.Path(__file__).resolve().parents[1]


def spectral_reference(base_dir, expert_dirs, matrix_rule, other_rule):
    """θ₀ + Δ in float64: ``matrix_rule(taus, family)`` on matrix leaves, else ``other_rule``."""
    from jaxmerge.leaves import LeafInfo

    base = read_native(base_dir)
    experts = [read_native(d) for d in expert_dirs]
    merged = {}
    for name, value in base.items():
        b = value.astype(np.float64)
        taus = np.stack([e[name].astype(np.float64) - b for e in experts])
        info = LeafInfo.from_name(name, value.shape, value.dtype)
        delta = matrix_rule(taus, info.family) if info.is_matrix else other_rule(taus)
        merged[name] = b + delta
    return merged


SPECTRAL_CASES = {
    "resmerge": (["--method=resmerge"], lambda t, f: ref.resmerge(t, family=f),
                 ref.resmerge_nonmatrix),
    "resmerge v1 options": (
        ["--method=resmerge", "--score_map=ramp", "--ffn_score_scale=1.0", "--head_rank=2",
         "--rho_max=0.3", "--head_gate=mean", "--svd=exact"],
        lambda t, f: ref.resmerge(t, family=f, score_map="ramp", ffn_score_scale=1.0,
                                  head_rank=2, rho_max=0.3, gate="mean"),
        ref.resmerge_nonmatrix),
    "tsv": (["--method=tsv", "--scale=0.7"], lambda t, f: ref.tsv(t, alpha=0.7),
            lambda t: ref.spectral_nonmatrix(t, 0.7)),
    "iso_c": (["--method=iso_c"], lambda t, f: ref.iso_c(t), ref.spectral_nonmatrix),
    "iso_cts": (["--method=iso_cts", "--common_fraction=0.6"],
                lambda t, f: ref.iso_cts(t, common_fraction=0.6), ref.spectral_nonmatrix),
    "star": (["--method=star", "--star_eta=60"], lambda t, f: ref.star(t, eta=60.0),
             lambda t: t.mean(0)),
    "task_arithmetic + svc": (
        ["--method=task_arithmetic", "--scale=0.5", "--calibrate=svc", "--svc_floor=0.2"],
        lambda t, f: ref.svc(ref.task_arithmetic(t, 0.5), t, floor=0.2),
        lambda t: ref.task_arithmetic(t, 0.5)),
}


@pytest.mark.parametrize("case", list(SPECTRAL_CASES))
def test_cli_spectral_methods_match_numpy_reference_and_load(tiny, tmp_path, case):
    args, matrix_rule, other_rule = SPECTRAL_CASES[case]
    base, experts = tiny
    out = tmp_path / "merged"
    assert run_cli(*args, f"--base={base}", experts_flag(experts), f"--output={out}") == 0
    assert_close_to_reference(out, spectral_reference(base, experts, matrix_rule, other_rule),
                              rtol=BF16_ULP)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_array_equal(
        model.model.layers[1].self_attn.o_proj.weight.detach().float().numpy(),
        read_native(out)["model.layers.1.self_attn.o_proj.weight"].astype(np.float32))
    record = json.loads((out / "jaxmerge_config.json").read_text())
    if "--calibrate=svc" in args:
        assert record["hyperparameters"]["calibrate"] == "svc"


@pytest.mark.parametrize("recipe,matrix_rule", [
    ("head_only_mean.py", lambda t, f: np.mean([ref.spectral_split(x)[0] for x in t], 0)),
    ("residual_only_mean.py", lambda t, f: np.mean([ref.spectral_split(x)[1] for x in t], 0)),
    ("src_a_without_head.py",
     lambda t, f: ref.src_a(np.stack([ref.spectral_split(x)[1] for x in t]), family=f)),
    ("src_a_ungated_head.py", lambda t, f: ref.resmerge(t, family=f, gate="none")),
])
def test_resmerge_ablation_recipes_from_the_cli(tiny, tmp_path, recipe, matrix_rule):
    base, experts = tiny
    out = tmp_path / "merged"
    assert run_cli(f"--recipe={REPO / 'examples' / 'recipes' / recipe}", f"--base={base}",
                   experts_flag(experts), f"--output={out}") == 0
    assert_close_to_reference(
        out, spectral_reference(base, experts, matrix_rule, ref.resmerge_nonmatrix),
        rtol=BF16_ULP)


@pytest.mark.parametrize("args,contains", [
    (["--method=resmerge", "--head_rank=0"], ["head_rank", "0"]),
    (["--method=resmerge", "--beta_min=0.9", "--beta_max=0.8"], ["beta_min", "beta_max"]),
    (["--method=resmerge", "--rho_max=-0.1"], ["rho_max"]),
    (["--method=iso_cts", "--common_fraction=1.5"], ["common_fraction", "1.5"]),
    (["--method=star", "--star_eta=0"], ["eta"]),
    (["--method=ties", "--calibrate=svc", "--svc_floor=0"], ["floor"]),
])
def test_bad_spectral_hyperparameters(tiny, tmp_path, capsys, args, contains):
    base, experts = tiny
    expect_error(capsys, tmp_path, *args, f"--base={base}", experts_flag(experts),
                 contains=contains)
