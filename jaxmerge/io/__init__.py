"""Checkpoint input and output: safetensors, Orbax and the Hugging Face directory around them."""

from jaxmerge.io.hf import (
    atomic_output,
    check_output_available,
    copy_auxiliary,
    write_config,
    write_model_card,
    write_record,
)
from jaxmerge.io.orbax_io import load_orbax, save_orbax
from jaxmerge.io.safetensors_io import (
    DTYPES,
    Checkpoint,
    ShardedWriter,
    TensorEntry,
    dtype_code,
    read_header,
)

__all__ = [
    "DTYPES",
    "Checkpoint",
    "ShardedWriter",
    "TensorEntry",
    "atomic_output",
    "check_output_available",
    "copy_auxiliary",
    "dtype_code",
    "load_orbax",
    "read_header",
    "save_orbax",
    "write_config",
    "write_model_card",
    "write_record",
]
