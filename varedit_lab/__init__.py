"""varedit-lab: source conditioning in visual-autoregressive image editing (VAREdit).

``import varedit_lab`` stays light; the editing API loads on first use:

* ``varedit_lab.edit(images, instructions, ckpt=... | released=... | fixture=...)`` -> edited PIL image(s);
* ``varedit_lab.Editor`` for repeated, batched editing with one loaded model.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"edit": "varedit_lab.editing", "Editor": "varedit_lab.editing", "load_editor": "varedit_lab.editing"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'varedit_lab' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
