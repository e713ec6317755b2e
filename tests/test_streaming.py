"""Streaming proof (slow; run with `pytest -m slow`): inputs several times the peak RSS.

Uses benchmarks/bench_streaming.py: 4 synthetic bf16 Llama-shaped checkpoints of 1 GB
each, merged by the CLI in a child process whose peak RSS (os.wait4) must stay well
under the 1.5 GB the foundation issue sets, and under a third of the inputs' size.
"""

import subprocess
import sys

import pytest

from benchmarks import bench_streaming

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_merge_of_4gb_inputs_stays_under_1_5gb(tmp_path_factory, method):
    root = tmp_path_factory.getbasetemp() / "streaming"
    shapes = bench_streaming.tensor_shapes(1.0)
    base = root / "base"
    bench_streaming.write_model(base, shapes, seed=0, base_seed=None)
    experts = [root / f"expert-{i}" for i in range(3)]
    for i, expert in enumerate(experts):
        bench_streaming.write_model(expert, shapes, seed=100 + i, base_seed=0)
    inputs = sum(f.stat().st_size for d in [base, *experts] for f in d.glob("*.safetensors"))
    result = bench_streaming.measure([
        sys.executable, "-m", "jaxmerge.main", f"--method={method}", f"--base={base}",
        f"--experts={','.join(map(str, experts))}", f"--output={root / method}",
        "--overwrite", "--progress=false"], root / "logs" / f"{method}.log")
    assert result["returncode"] == 0, result["output"]
    peak = result["peak_rss_mb"] * 1e6
    print(f"{method}: inputs {inputs / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB")
    assert peak < 1.5e9
    assert inputs > 3 * peak
    subprocess.run(["rm", "-rf", str(root / method)], check=True)
