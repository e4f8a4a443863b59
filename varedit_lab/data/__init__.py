"""Edit data: webdataset shards, the DataModule, the synthetic edit benchmark and converters.

Submodules import lazily so that ``import varedit_lab.data`` does not pull in Lightning:

* :mod:`varedit_lab.data.synth`: ``SyntheticEditGenerator``, ``write_synthetic_shards``;
* :mod:`varedit_lab.data.convert`: ``convert_to_shards`` (folder / JSONL of edit triples);
* :mod:`varedit_lab.data.samples`: decoding, the batch contract, bad-sample accounting;
* :mod:`varedit_lab.data.datamodule`: ``EditDataModule``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EditSample": "synth",
    "SyntheticEditGenerator": "synth",
    "write_synthetic_shards": "synth",
    "EDIT_KINDS": "synth",
    "convert_to_shards": "convert",
    "BadSampleError": "samples",
    "BadSampleWarning": "samples",
    "collate_edits": "samples",
    "EditDataModule": "datamodule",
    "expand_shards": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'varedit_lab.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"varedit_lab.data.{_EXPORTS[name]}"), name)
