"""Source-conditioning strategies: each produces a plan that the model executes."""

from conditioning.base import (
    ConditioningPlan,
    ConditioningStrategy,
    KVExtension,
    LayerVisibility,
    SequenceLayout,
)
from conditioning.registry import available, build, register, resolve

__all__ = [
    "ConditioningPlan",
    "ConditioningStrategy",
    "KVExtension",
    "LayerVisibility",
    "SequenceLayout",
    "available",
    "build",
    "register",
    "resolve",
]
