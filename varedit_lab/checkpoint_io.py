"""Opening checkpoint files without executing them.

Every file varedit-lab opens is untrusted: a pickle can run arbitrary code while it is unpickled.
``torch.load(weights_only=True)`` allows tensors and plain containers only, and every loader of the
project goes through :func:`load_weights`. Sharded checkpoints (``torch.distributed.checkpoint``
directories written under ``fsdp``/``fsdp2``) are worse: DCP unpickles its ``.metadata`` file with
plain :mod:`pickle` and loads non-tensor entries (optimizer hyper-parameters) with
``weights_only=False``. :func:`check_sharded_checkpoint` reads the metadata with an unpickler that
knows only DCP's own record classes and checks every non-tensor entry with ``weights_only=True``
*before* anything else (Lightning, ``export``) opens the directory.

This module is a leaf: it imports torch and the standard library only, so that every layer (model,
tokenizer, training, CLI) can use it.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

# Lightning writes this next to the DCP shards (rank 0, after the shards): trainer state, config.
SHARDED_METADATA_FILE = "meta.pt"
DCP_METADATA_FILE = ".metadata"


class CheckpointError(ValueError):
    """A file is not a checkpoint of the expected kind, or does not match the model it is loaded into."""


class UnsafeCheckpointError(CheckpointError):
    """A file would need arbitrary Python objects to load (it could execute code): refused."""


def _unsafe(path: str | os.PathLike, what: str, detail: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused to open this {what}: loading it needs Python objects beyond tensors and plain containers "
        f"({detail}). Such a file can execute code when it is unpickled; varedit-lab only opens files that load with "
        "torch.load(weights_only=True). Re-save the tensors as a plain state dict if you trust its origin."
    )


def load_weights(path: str | os.PathLike, what: str = "checkpoint", *, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that say what went wrong.

    Raises :class:`UnsafeCheckpointError` for a pickle that needs more than tensors and plain
    containers, :class:`CheckpointError` for a file that is not a torch checkpoint at all, and
    :class:`FileNotFoundError` for a missing file. ``what`` names the file's role in messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        unsafe = [line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line]
        raise _unsafe(path, what, unsafe[0] if unsafe else (first[0] if first else type(err).__name__)) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        if mmap and "mmap" in str(err):  # an old (non-zip) torch file cannot be memory-mapped: plain load
            return load_weights(path, what, mmap=False, map_location=map_location)
        raise CheckpointError(f"{what} {path}: not a readable torch checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


# -- sharded (DCP) checkpoints ----------------------------------------------------------------------
# The classes a DCP ``.metadata`` pickle legitimately refers to (torch 2.4 - 2.13).
_DCP_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                     "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    }
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
       ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}
)


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata records and torch dtypes; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not a DCP metadata record")


def read_dcp_metadata(directory: str | os.PathLike) -> Metadata:
    """The ``.metadata`` of a DCP directory, read without executing anything it does not allow."""
    path = Path(directory) / DCP_METADATA_FILE
    try:
        with open(path, "rb") as handle:
            metadata = _DCPMetadataUnpickler(handle).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: no {DCP_METADATA_FILE} (not a complete sharded checkpoint)") from None
    except pickle.UnpicklingError as err:
        raise _unsafe(path, "sharded-checkpoint metadata", str(err)) from None
    except (EOFError, AttributeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not DCP metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader with :func:`read_dcp_metadata` instead of a plain ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files are not written by our strategies
            raise CheckpointError(f"{self.path}: per-rank DCP metadata is not supported")
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_sharded_checkpoint(directory: str | os.PathLike) -> Metadata:
    """Refuse a DCP directory that could execute code when Lightning or DCP opens it.

    Checks the metadata (restricted unpickler), every non-tensor entry (``weights_only=True``: DCP
    itself loads them with ``weights_only=False``) and Lightning's ``meta.pt``. Returns the metadata.
    """
    directory = Path(directory)
    metadata = read_dcp_metadata(directory)
    for index, info in (metadata.storage_data or {}).items():
        entry = metadata.state_dict_metadata.get(index.fqn)
        if not isinstance(entry, BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{directory}: entry {index.fqn} is stored with transforms {info.transform_descriptors}; not supported")
        shard = (directory / info.relative_path).resolve()
        if directory.resolve() not in shard.parents:
            raise CheckpointError(f"{directory}: entry {index.fqn} points outside the checkpoint ({info.relative_path})")
        with open(shard, "rb") as handle:
            handle.seek(info.offset)
            raw = handle.read(info.length)
        try:
            torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise _unsafe(directory, f"sharded checkpoint (entry {index.fqn})", str(err).splitlines()[0]) from None
        except (RuntimeError, EOFError, ValueError) as err:
            raise CheckpointError(f"{directory}: entry {index.fqn} is not readable ({type(err).__name__}: {err})") from None
    load_weights(directory / SHARDED_METADATA_FILE, "sharded-checkpoint trainer state")
    return metadata


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A complete DCP checkpoint directory (shards, DCP's ``.metadata`` and Lightning's ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA_FILE).is_file() and (path / SHARDED_METADATA_FILE).is_file()


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A Lightning checkpoint file (single process, DDP) or a complete sharded directory (FSDP)."""
    return Path(path).is_file() or is_sharded_checkpoint(path)


def check_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Validate a training checkpoint (file or sharded directory) before anyone else opens it; returns
    the loaded file (memory-mapped) or the trainer state (``meta.pt``) of a sharded directory."""
    if is_sharded_checkpoint(path):
        check_sharded_checkpoint(path)
        return load_weights(Path(path) / SHARDED_METADATA_FILE, what)
    return load_weights(path, what, mmap=True)


__all__ = [
    "CheckpointError",
    "SafeFileSystemReader",
    "UnsafeCheckpointError",
    "check_checkpoint",
    "check_sharded_checkpoint",
    "is_checkpoint",
    "is_sharded_checkpoint",
    "load_weights",
    "read_dcp_metadata",
]
