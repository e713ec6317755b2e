"""Tests for jaxmerge.io: safetensors reading and writing, HF directory helpers, Orbax."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxmerge.errors import CheckpointError, ConfigError
from jaxmerge.io import (
    DTYPES,
    Checkpoint,
    ShardedWriter,
    atomic_output,
    copy_auxiliary,
    dtype_code,
    load_orbax,
    read_header,
    save_orbax,
    write_config,
    write_model_card,
    write_record,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


def _random(shape, dtype, seed=0):
    values = np.random.default_rng(seed).standard_normal(shape)
    return values.astype(dtype)


def _tensors():
    return {
        "model.embed_tokens.weight": _random((8, 4), BF16, 1),
        "model.layers.0.mlp.up_proj.weight": _random((6, 4), np.float16, 2),
        "model.norm.weight": _random((4,), np.float32, 3),
        "scale": np.array(2.5, np.float32),
        "ids": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False, True]),
    }


def _save_model(directory, tensors=None, name="model.safetensors", metadata=None):
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _tensors() if tensors is None else tensors
    save_file(tensors, str(directory / name), metadata=metadata)
    return tensors


def _save_sharded(directory):
    tensors = _tensors()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3],
              "model-00002-of-00002.safetensors": names[3:]}
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(directory / shard))
        weight_map.update({n: shard for n in members})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors, shards


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------- headers and dtypes


def test_dtype_codes_round_trip():
    for code, dtype in DTYPES.items():
        assert dtype_code(dtype) == code
    assert DTYPES["BF16"] == BF16
    with pytest.raises(ValueError):
        dtype_code(np.complex64)


def test_read_header_matches_safetensors_writer(tmp_path):
    tensors = _save_model(tmp_path, metadata={"format": "pt", "note": "hi"})
    entries, metadata = read_header(tmp_path / "model.safetensors")
    assert metadata == {"format": "pt", "note": "hi"}
    assert set(entries) == set(tensors)
    offsets = [entry.offset for entry in entries.values()]
    assert offsets == sorted(offsets)
    for name, value in tensors.items():
        entry = entries[name]
        assert (entry.dtype, entry.shape, entry.nbytes) == (value.dtype, value.shape, value.nbytes)
        assert entry.path == tmp_path / "model.safetensors"
    assert entries["model.embed_tokens.weight"].row_nbytes == 4 * 2
    assert entries["scale"].row_nbytes == 4


# --------------------------------------------------------------------------- Checkpoint reads


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16), np.dtype(np.float32)])
def test_read_equals_what_safetensors_wrote(tmp_path, dtype):
    value = _random((5, 3), dtype)
    _save_model(tmp_path, {"w": value, "b": _random((3,), dtype, 1)})
    with Checkpoint.open(tmp_path) as checkpoint:
        assert _same(checkpoint.read("w"), value)
        assert checkpoint.bytes_read == value.nbytes


def test_read_every_dtype(tmp_path):
    tensors = _save_model(tmp_path)
    with Checkpoint.open(tmp_path) as checkpoint:
        assert list(checkpoint.tensors) == list(read_header(tmp_path / "model.safetensors")[0])
        for name, value in tensors.items():
            assert _same(checkpoint.read(name), value)
        assert checkpoint.bytes_read == sum(v.nbytes for v in tensors.values())


def test_row_slice_reads(tmp_path):
    value = _random((10, 3), BF16)
    _save_model(tmp_path, {"w": value})
    checkpoint = Checkpoint.open(tmp_path)
    assert _same(checkpoint.read("w", rows=(2, 7)), value[2:7])
    assert _same(checkpoint.read("w", rows=(9, 10)), value[9:])
    assert checkpoint.read("w", rows=(4, 4)).shape == (0, 3)
    with pytest.raises(ValueError):
        checkpoint.read("w", rows=(5, 11))
    checkpoint.close()


def test_read_into_view_of_stacked_buffer(tmp_path):
    value = _random((4, 3), np.float16)
    _save_model(tmp_path, {"w": value})
    stacked = np.zeros((2, 3, 4, 3), np.float16)
    with Checkpoint.open(tmp_path) as checkpoint:
        result = checkpoint.read("w", out=stacked[1, 2])
        checkpoint.read("w", out=stacked[0, 0, 1:3], rows=(0, 2))
    assert result.base is not None and _same(stacked[1, 2], value)
    assert _same(stacked[0, 0, 1:3], value[:2])
    assert not stacked[1, :2].any() and not stacked[0, 1:].any()


def test_read_rejects_unsuitable_out(tmp_path):
    _save_model(tmp_path, {"w": _random((4, 3), np.float32)})
    with Checkpoint.open(tmp_path) as checkpoint:
        with pytest.raises(ValueError, match="C-contiguous"):
            checkpoint.read("w", out=np.zeros((3, 4), np.float32).T)
        with pytest.raises(ValueError, match="expected"):
            checkpoint.read("w", out=np.zeros((4, 3), np.float16))


def test_sharded_checkpoint_via_index(tmp_path):
    tensors, shards = _save_sharded(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8}))
    with Checkpoint.open(tmp_path) as checkpoint:
        assert checkpoint.config == {"vocab_size": 8}
        first = list(checkpoint.tensors)[:3]
        assert set(first) == set(shards["model-00001-of-00002.safetensors"])
        for name, value in tensors.items():
            assert _same(checkpoint.read(name), value)
        assert checkpoint.tensors["scale"].path.name == "model-00002-of-00002.safetensors"


def test_open_single_file_path_and_lone_file(tmp_path):
    tensors = _save_model(tmp_path, name="weights.safetensors")
    for path in (tmp_path, tmp_path / "weights.safetensors"):
        with Checkpoint.open(path) as checkpoint:
            assert checkpoint.directory == tmp_path
            assert checkpoint.config is None
            assert _same(checkpoint.read("ids"), tensors["ids"])


# --------------------------------------------------------------------------- error cases


def _error(path):
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(path)
    return str(info.value)


def test_missing_directory(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope")
    assert "nope" in _error(tmp_path / "nope")


def test_directory_without_safetensors(tmp_path):
    assert str(tmp_path) in _error(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    assert "notes.txt" in _error(tmp_path / "notes.txt")


def test_several_files_without_index(tmp_path):
    _save_model(tmp_path, name="a.safetensors")
    _save_model(tmp_path, name="b.safetensors")
    assert "index" in _error(tmp_path)


def test_missing_shard(tmp_path):
    _, shards = _save_sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    message = _error(tmp_path)
    assert "model-00002-of-00002.safetensors" in message
    assert repr(shards["model-00002-of-00002.safetensors"][0]) in message


def test_malformed_index(tmp_path):
    _save_sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    assert "model.safetensors.index.json" in _error(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    assert "weight_map" in _error(tmp_path)


def test_index_maps_tensor_shard_lacks(tmp_path):
    _save_sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    message = _error(tmp_path)
    assert "ghost.weight" in message and "model-00001-of-00002.safetensors" in message


def test_truncated_file(tmp_path):
    _save_model(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    message = _error(tmp_path)
    assert "model.safetensors" in message and "truncated" in message
    path.write_bytes(data[:5])
    assert "model.safetensors" in _error(tmp_path)
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    assert "model.safetensors" in _error(tmp_path)


def test_truncated_after_open(tmp_path):
    _save_model(tmp_path, {"w": _random((4, 4), np.float32)})
    checkpoint = Checkpoint.open(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="model.safetensors.*'w'.*truncated"):
        checkpoint.read("w")
    checkpoint.close()


def _write_raw(path, header: bytes, data=b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_bad_header_json(tmp_path):
    _write_raw(tmp_path / "model.safetensors", b"{oops")
    message = _error(tmp_path)
    assert "model.safetensors" in message and "JSON" in message


@pytest.mark.parametrize("spec, expected", [
    ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "dtype"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "bytes"),
    ({"dtype": "F32", "shape": [2]}, "data_offsets"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "truncated"),
])
def test_bad_tensor_entries(tmp_path, spec, expected):
    _write_raw(tmp_path / "model.safetensors", json.dumps({"w": spec}).encode(), bytes(8))
    message = _error(tmp_path)
    assert "model.safetensors" in message and "'w'" in message and expected in message


def test_missing_tensor_and_bad_config(tmp_path):
    _save_model(tmp_path)
    with Checkpoint.open(tmp_path) as checkpoint:
        with pytest.raises(CheckpointError, match="no tensor 'ghost'"):
            checkpoint.read("ghost")
    (tmp_path / "config.json").write_text("{")
    assert "config.json" in _error(tmp_path)


# --------------------------------------------------------------------------- ShardedWriter


def _layout(tensors):
    return [(name, value.dtype, value.shape) for name, value in tensors.items()]


def test_writer_single_shard_loads_with_safetensors(tmp_path):
    tensors = {f"layer.{i}.weight": _random((3, i + 1), np.float32, i) for i in range(4)}
    tensors["scalar"] = np.array(1.5, np.float32)
    writer = ShardedWriter(tmp_path, _layout(tensors), 1 << 20, metadata={"who": "test"})
    for name, value in reversed(tensors.items()):
        writer.write(name, value)
    assert writer.close() == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as file:
        assert file.metadata() == {"format": "pt", "who": "test"}
        for name, value in tensors.items():
            assert _same(file.get_tensor(name), value)
    (header_len,) = struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])
    assert (8 + header_len) % 8 == 0


def test_writer_shards_respect_limit(tmp_path):
    sizes = [10, 30, 20, 100, 5, 5, 40]
    tensors = {f"t{i}": _random((n,), np.float32, i) for i, n in enumerate(sizes)}
    limit = 60 * 4
    writer = ShardedWriter(tmp_path, _layout(tensors), limit)
    for name, value in tensors.items():
        writer.write(name, value)
    files = writer.close()
    shards = writer.shard_files
    assert shards == [f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]
    assert files == [*shards, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert list(index["weight_map"]) == sorted(tensors)
    groups = [["t0", "t1", "t2"], ["t3"], ["t4", "t5", "t6"]]
    assert [sorted(n for n, s in index["weight_map"].items() if s == shard)
            for shard in shards] == groups
    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="numpy") as file:
            names = list(file.keys())
            data = sum(tensors[n].nbytes for n in names)
            assert data <= limit or len(names) == 1
            for name in names:
                assert index["weight_map"][name] == shard
                assert _same(file.get_tensor(name), tensors[name])
    with Checkpoint.open(tmp_path) as checkpoint:
        assert list(checkpoint.tensors) == list(tensors)
        for name, value in tensors.items():
            assert _same(checkpoint.read(name), value)


def test_writer_row_wise_partial_writes_bf16(tmp_path):
    value = _random((7, 3), BF16)
    small = _random((2,), np.float16)
    writer = ShardedWriter(tmp_path, [("w", BF16, (7, 3)), ("s", small.dtype, (2,))], 1 << 20)
    for start, stop in [(5, 7), (0, 2), (2, 5)]:
        writer.write("w", value[start:stop], rows=(start, stop))
    writer.write("s", small)
    writer.close()
    with Checkpoint.open(tmp_path) as checkpoint:
        assert _same(checkpoint.read("w"), value)
        assert _same(checkpoint.read("s"), small)
        # Tensors are laid out by decreasing itemsize, so each stays aligned.
        assert all(e.offset % e.dtype.itemsize == 0 for e in checkpoint.tensors.values())


def test_writer_starts_writeback_as_it_writes(tmp_path, monkeypatch):
    """Each write asks the kernel to start writing its bytes back (Linux); the file is
    then the same, and the closing fsync has less to do."""
    import sys

    from jaxmerge.io import safetensors_io

    ranges = []
    real = safetensors_io._start_writeback
    monkeypatch.setattr(safetensors_io, "_start_writeback",
                        lambda fd, offset, length: (ranges.append((offset, length)),
                                                    real(fd, offset, length)))
    value = np.arange(24, dtype=np.float32).reshape(6, 4)
    writer = ShardedWriter(tmp_path, [("w", np.dtype(np.float32), (6, 4))], 10**9)
    writer.write("w", value[:2], rows=(0, 2))
    writer.write("w", value[2:], rows=(2, 6))
    writer.close()
    assert [length for _, length in ranges] == [32, 64]
    assert ranges[1][0] == ranges[0][0] + 32
    assert (safetensors_io._sync_file_range() is not None) == sys.platform.startswith("linux")
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("w"), value)


def test_writer_close_fails_on_unwritten_tensor(tmp_path):
    writer = ShardedWriter(tmp_path, [("a", np.dtype(np.float32), (4, 2)),
                                      ("b", np.dtype(np.float32), (2,))], 1 << 20)
    writer.write("a", np.zeros((2, 2), np.float32), rows=(0, 2))
    writer.write("b", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="'a'"):
        writer.close()


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        ShardedWriter(tmp_path, [("a", np.float32, (1,)), ("a", np.float32, (1,))], 100)
    writer = ShardedWriter(tmp_path, [("a", np.dtype(np.float32), (3, 2))], 100)
    with pytest.raises(ValueError, match="declared"):
        writer.write("a", np.zeros((3, 2), np.float16))
    with pytest.raises(ValueError, match="declared"):
        writer.write("a", np.zeros((2, 2), np.float32), rows=(0, 1))
    with pytest.raises(ValueError):
        writer.write("ghost", np.zeros(1, np.float32))
    writer.abort()


# --------------------------------------------------------------------------- atomic output


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


def test_atomic_output_success(tmp_path):
    output = tmp_path / "sub" / "out"
    with atomic_output(output, overwrite=False) as staging:
        assert staging.parent == output.parent and staging.name.startswith(".out.jaxmerge-tmp-")
        (staging / "x.txt").write_text("new")
    assert (output / "x.txt").read_text() == "new"
    assert _entries(output.parent) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_cleans_up_on_error(tmp_path, error):
    output = tmp_path / "out"
    with pytest.raises(error):
        with atomic_output(output, overwrite=False) as staging:
            (staging / "x.txt").write_text("partial")
            raise error()
    assert _entries(tmp_path) == []


def test_atomic_output_refuses_existing_output(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        with atomic_output(output, overwrite=False):
            pytest.fail("must not be entered")
    assert _entries(tmp_path) == ["out"] and _entries(output) == ["keep.txt"]


def test_atomic_output_overwrite_replaces(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with atomic_output(output, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert _entries(output) == ["new.txt"]
    assert _entries(tmp_path) == ["out"]


def test_atomic_output_failed_overwrite_keeps_old(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(output, overwrite=True):
            raise RuntimeError("boom")
    assert _entries(output) == ["old.txt"] and _entries(tmp_path) == ["out"]


# --------------------------------------------------------------------------- Orbax


def test_orbax_round_trip(tmp_path):
    params = {
        "model.layers.0.self_attn.q_proj.weight": _random((4, 3), BF16),
        "model.norm.weight": _random((3,), np.float32, 1),
        "lm_head.weight": _random((2, 3), np.float16, 2),
        "step": np.array(7, np.int64),
        "empty.weight": np.zeros((0, 3), BF16),
    }
    save_orbax(tmp_path / "orbax", params)
    restored = load_orbax(tmp_path / "orbax")
    assert set(restored) == set(params)
    for name, value in params.items():
        assert _same(restored[name], value), name
    with pytest.raises(CheckpointError, match="nope"):
        load_orbax(tmp_path / "nope")


# --------------------------------------------------------------------------- HF directory files


def test_config_record_and_auxiliary_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text('{"do_sample": false}')
    (src / "optimizer.pt").write_text("skip me")
    assert copy_auxiliary(src, dst) == ["tokenizer.json", "generation_config.json"]
    assert _entries(dst) == ["generation_config.json", "tokenizer.json"]

    write_config({"vocab_size": 8, "torch_dtype": "float32"}, dst, "bfloat16", {"vocab_size": 9})
    config = json.loads((dst / "config.json").read_text())
    assert config == {"vocab_size": 9, "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    write_config(None, tmp_path, "float16")
    assert not (tmp_path / "config.json").exists()

    write_record(dst, {"method": "ties", "b": 1, "a": 2})
    text = (dst / "jaxmerge_config.json").read_text()
    assert list(json.loads(text)) == ["method", "b", "a"] and '\n  "method"' in text


def test_model_card(tmp_path):
    write_model_card(tmp_path, base="org/base-model", experts=["org/math", "/data/code expert"],
                     method="ties", hyperparameters={"density": 0.2, "weights": [1, 1]},
                     command="jaxmerge --method=ties --output=out", version="0.1.0")
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/base-model\nlibrary_name: transformers\n")
    assert "tags:\n- merge\n- jaxmerge\n- ties\n---\n" in card
    assert "merged with jaxmerge 0.1.0 using the ties method" in card
    assert "## Models merged" in card and "- `org/math`" in card
    assert "- `/data/code expert`" in card
    assert '"density": 0.2' in card and '"method": "ties"' in card
    assert "```bash\njaxmerge --method=ties --output=out\n```" in card
