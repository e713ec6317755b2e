"""The Hugging Face directory around the merged tensors: config, tokenizer, card, record.

The output directory is built in a hidden sibling staging directory and renamed into place
only when everything succeeded, so a failed or interrupted merge leaves nothing behind and
an existing output is never half-overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import secrets
import shutil
from collections.abc import Iterator

from jaxmerge.errors import ConfigError

AUXILIARY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
)
CONFIG_FILE = "config.json"
RECORD_FILE = "jaxmerge_config.json"
MODEL_CARD_FILE = "README.md"
_PLAIN_YAML = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/\-]*")


def copy_auxiliary(src_dir, dst_dir) -> list[str]:
    """Copies the tokenizer and generation files present in ``src_dir`` to ``dst_dir``.

    Returns:
      The names of the files copied.
    """
    src_dir, dst_dir = pathlib.Path(src_dir), pathlib.Path(dst_dir)
    copied = []
    for name in AUXILIARY_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def _write_json(path: pathlib.Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_config(src_config: dict | None, dst_dir, dtype_name: str,
                 overrides: dict | None = None) -> None:
    """Writes ``config.json``: the base config with the output dtype and overrides.

    Args:
      src_config: the base model's parsed config; nothing is written when None.
      dst_dir: output directory.
      dtype_name: "bfloat16", "float16" or "float32"; sets ``torch_dtype`` and ``dtype``.
      overrides: keys to set after the dtype (e.g. a resized ``vocab_size``).
    """
    if src_config is None:
        return
    config = {**src_config, "torch_dtype": dtype_name, "dtype": dtype_name, **(overrides or {})}
    _write_json(pathlib.Path(dst_dir) / CONFIG_FILE, config)


def write_record(dst_dir, record: dict) -> None:
    """Writes ``jaxmerge_config.json``, the record of how the merge was made."""
    _write_json(pathlib.Path(dst_dir) / RECORD_FILE, record)


def _yaml_scalar(value: str) -> str:
    """A YAML scalar: bare when unambiguous, else double-quoted (JSON quoting is valid YAML)."""
    return value if _PLAIN_YAML.fullmatch(value) else json.dumps(value)


def write_model_card(dst_dir, *, base: str, experts: list[str], method: str,
                     hyperparameters: dict, command: str, version: str) -> None:
    """Writes a ``README.md`` model card saying what was merged, how, and how to redo it.

    Args:
      dst_dir: output directory.
      base: base model path or hub id.
      experts: expert model paths or hub ids.
      method: merge method name.
      hyperparameters: method hyperparameters.
      command: the command line that produced the merge.
      version: jaxmerge version.
    """
    title = f"{pathlib.PurePath(base).name or base} ({method} merge)"
    configuration = json.dumps({"method": method, "hyperparameters": hyperparameters},
                               indent=2, default=str)
    lines = [
        "---",
        f"base_model: {_yaml_scalar(base)}",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- jaxmerge",
        f"- {_yaml_scalar(method)}",
        "---",
        "",
        f"# {title}",
        "",
        f"This model was merged with jaxmerge {version} using the {method} method, "
        f"with `{base}` as the base model.",
        "",
        "## Models merged",
        "",
        f"- `{base}` (base)",
        *[f"- `{expert}`" for expert in experts],
        "",
        "## Configuration",
        "",
        "```json",
        configuration,
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    (pathlib.Path(dst_dir) / MODEL_CARD_FILE).write_text("\n".join(lines), encoding="utf-8")


def check_output_available(output, overwrite: bool) -> None:
    """Fails early if ``output`` exists and may not be replaced.

    Raises:
      ConfigError: ``output`` exists and ``overwrite`` is false, or it is not a directory.
    """
    output = pathlib.Path(output)
    if not (output.exists() or output.is_symlink()):
        return
    if not overwrite:
        raise ConfigError(
            f"output directory {output} already exists; pass --overwrite to replace it")
    if not output.is_dir() or output.is_symlink():
        raise ConfigError(f"output {output} exists and is not a directory; not replacing it")


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_directory(staging, output) -> None:
    """Renames the finished ``staging`` directory to ``output`` (replacing an existing one)."""
    _replace(pathlib.Path(staging), pathlib.Path(output))


def _replace(staging: pathlib.Path, output: pathlib.Path) -> None:
    """Renames ``staging`` to ``output``, moving an existing output aside first."""
    old = None
    if output.exists() or output.is_symlink():
        old = output.parent / f".{output.name}.jaxmerge-old-{os.getpid()}"
        _remove(old)
        output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        if old is not None:
            old.rename(output)
        raise
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_output(output, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yields a staging directory that becomes ``output`` when the block succeeds.

    The staging directory is a hidden sibling of ``output``, so the final rename stays on
    one file system. On any exception (KeyboardInterrupt included) it is removed and the
    exception re-raised; an existing ``output`` is untouched.

    Args:
      output: the final output directory.
      overwrite: whether an existing ``output`` may be replaced.

    Raises:
      ConfigError: ``output`` exists and ``overwrite`` is false (checked before anything
        is created).
    """
    output = pathlib.Path(output)
    check_output_available(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / (
        f".{output.name}.jaxmerge-tmp-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        yield staging
        check_output_available(output, overwrite)
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
