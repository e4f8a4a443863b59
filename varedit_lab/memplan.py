"""A memory plan: what one device holds to train (and to edit with) a config, before launching it.

Per device, in bytes: parameters, gradients and AdamW state (replicated under DDP, divided by the
world size under FSDP/FSDP2, plus the gathered blocks in flight), the activations saved for the
backward pass (with and without per-block activation checkpointing), the frozen text encoder and VAE,
and the KV cache of a guided edit. The activation terms come from counting the tensors this
implementation saves for backward (``torch.autograd.graph.saved_tensors_hooks``) at width C, MLP
width H, sequence length L and T target tokens, per sample:

* each block saves ``20 C + 2 H`` values per token (fp32 runs); the last block computes outputs
  only for the T target rows: ``8 C L + (12 C + 2 H) T``;
* outside the blocks: ``L C + 2 T C + 3 T V`` (embedded input, head norm in/out, logits and loss),
  and the text path ``Lt (3 Ct + 3 C)`` for ``Lt`` text tokens of width ``Ct``; each block's
  cross-attention keeps ``3 Lt C`` (its text input and keys/values);
* with checkpointing a block keeps only its input (``L C``) and one block is recomputed at a time;
* the forward ends with one FFN-hidden buffer in flight (``L H``);
* under ``bf16-mixed`` the matmul operands are saved in bf16, the residual-stream tensors (6 C per
  token) in fp32: an estimate until ``benchmarks/gpu_check.py`` measures it.

The peak of a training step is the larger of the end of the forward (all saved activations) and the
end of the backward (all gradients plus the last recomputed block). ``benchmarks/memory_plan.py``
checks the plan against measured peaks of real CPU runs (:class:`LiveTensorPeak`).
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conditioning import build as build_strategy
from varedit_lab.model.build import transformer_config
from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.model.transformer import VAREditTransformer
from varedit_lab.released import T5_XL_ENCODER
from varedit_lab.tokenizer.vae import BSQTokenizer, VAEArch

GIB = 2**30
SHARDED = ("fsdp", "fsdp2")
# CUDA context, cuBLAS workspaces and allocator slack kept free when sizing the batch.
RESERVE_BYTES = 2 * GIB
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_size(text: str) -> int:
    """``80GB`` / ``80GiB`` / ``80`` (GiB) -> bytes (GPU marketing GB are GiB in practice: 80 GB H100 = 79.6 GiB usable)."""
    value = text.strip().upper().replace("IB", "B")
    for unit, factor in (("TB", 2**40), ("GB", GIB), ("MB", 2**20)):
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    try:
        return int(float(value) * GIB)
    except ValueError:
        raise ValueError(f"--gpu-mem {text!r}: give a size such as 80GB, 141GB or 24GiB") from None


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _text_encoder_params(cfg: Any) -> tuple[int, int]:
    """(parameters, width) of the frozen T5 encoder, built on the meta device from its config."""
    from transformers import T5Config, T5EncoderModel

    path = Path(cfg.text.path) if cfg.text.path else None
    if path is not None and (path / "config.json").is_file():
        config = T5Config.from_pretrained(path)
    elif path is not None:  # a path that is not here yet (a template): the released flan-t5-xl
        config = T5Config(**T5_XL_ENCODER, is_encoder_decoder=False)
    else:
        t = cfg.text
        config = T5Config(vocab_size=384, d_model=t.tiny_d_model, d_kv=t.tiny_d_model // t.tiny_num_heads, d_ff=t.tiny_d_ff,
                          num_layers=t.tiny_num_layers, num_heads=t.tiny_num_heads, feed_forward_proj="gated-gelu",
                          is_encoder_decoder=False)
    with torch.device("meta"):
        return _count(T5EncoderModel(config)), int(config.d_model)


@dataclass(frozen=True)
class Shape:
    """What the activation terms depend on."""

    width: int
    mlp_hidden: int
    depth: int
    length: int  # L: source + target tokens of one sample
    targets: int  # T
    logit_width: int  # V = 2 d'
    text_channels: int  # Ct
    params: int
    trainable: int
    block_params: int
    text_params: int
    text_bytes: int
    vae_params: int
    vae_transient_per_sample: int  # bytes: the widest full-resolution VAE feature maps (no grad)

    def block_saved(self, last: bool) -> float:
        """Values saved for backward by one block for one sample (fp32 runs)."""
        c, h = self.width, self.mlp_hidden
        return 8 * c * self.length + (12 * c + 2 * h) * self.targets if last else (20 * c + 2 * h) * self.length

    def block_bytes(self, last: bool, mixed: bool, act_bytes: int) -> float:
        if not mixed:
            return self.block_saved(last) * act_bytes
        # bf16-mixed: 6 C residual-stream values per token stay fp32, the matmul operands are bf16.
        c = self.width
        fp32_part = 6 * c * (self.length if not last else self.targets)
        return fp32_part * 4 + (self.block_saved(last) - fp32_part) * 2


def model_shape(cfg: Any) -> Shape:
    arch = VAEArch.from_any(cfg.tokenizer)
    with torch.device("meta"):
        vae = BSQTokenizer(arch)
    text_params, text_width = _text_encoder_params(cfg)
    model_cfg = cfg.model
    tcfg = transformer_config(model_cfg, arch.codebook_dim, arch.apply_spatial_patchify)
    if model_cfg.text_channels is None:
        tcfg = type(tcfg)(**{**asdict(tcfg), "text_channels": text_width})
    with torch.device("meta"):
        model = VAREditTransformer(tcfg)
    params = _count(model)
    frozen = 0 if cfg.model.cond_drop_rate else model.cfg_uncond.numel()
    schedule = ScaleSchedule.from_scales(cfg.model.scales)
    layout = build_strategy(cfg.conditioning.name, dict(cfg.conditioning.options)).layout(schedule, cfg.model.rope_layout)
    side = cfg.data.image_size
    widest = max(arch.base_ch * m * (side // 2**i) ** 2 for i, m in enumerate(arch.encoder_ch_mult))
    return Shape(
        width=tcfg.width, mlp_hidden=tcfg.mlp_hidden, depth=tcfg.depth, length=layout.length, targets=schedule.total,
        logit_width=2 * tcfg.token_channels, text_channels=tcfg.text_channels, params=params, trainable=params - frozen, block_params=_count(model.blocks[0]),
        text_params=text_params, text_bytes=text_params * _DTYPE_BYTES[cfg.text.dtype], vae_params=_count(vae),
        vae_transient_per_sample=2 * 3 * widest * 4,  # source and target, ~3 live maps each, fp32
    )


def _world(cfg: Any, gpus_per_node: int) -> int:
    devices = cfg.trainer.devices if cfg.trainer.devices > 0 else gpus_per_node
    return devices * cfg.trainer.num_nodes


def train_memory(shape: Shape, cfg: Any, batch: int, checkpointing: bool, world: int, text_tokens: int = 32) -> dict[str, float]:
    """Bytes per device of one training step at ``batch`` samples per device with instructions of
    ``text_tokens`` T5 tokens."""
    precision = str(cfg.trainer.precision)
    mixed = precision.startswith("bf16-mixed") or precision.startswith("16-mixed")
    half_params = precision in ("bf16-true", "16-true", "bf16", "16")
    pb = 2 if half_params else 4
    act = 2 if half_params else 4
    strategy = str(cfg.trainer.strategy)
    shard = world if strategy in SHARDED else 1
    params = shape.params * pb / shard
    grads = shape.trainable * pb / shard
    optimizer = 2 * shape.trainable * pb / shard + (shape.params * 4 / shard if cfg.optim.ema_decay else 0)
    # DDP keeps a second copy of the gradients in its all-reduce buckets; FSDP gathers blocks (the
    # one computing and the one prefetched) and holds one block's full gradient before reduce-scatter.
    comm = shape.trainable * pb if strategy.startswith("ddp") and world > 1 else 0.0
    if shard > 1:
        comm = shape.block_params * pb * 3
    autocast_cache = shape.params * 2 if mixed and shard == 1 else 0.0  # bf16 copies of the weights during the forward
    c, h, n_l, n_t, v = shape.width, shape.mlp_hidden, shape.length, shape.targets, shape.logit_width
    other = (n_l * c + 2 * n_t * c + 3 * n_t * v + text_tokens * (3 * shape.text_channels + 3 * c)) * 4 * batch
    cross_text = 3 * text_tokens * c * (2 if mixed else act) * batch
    blocks = [shape.block_bytes(i == shape.depth - 1, mixed, act) * batch + cross_text for i in range(shape.depth)]
    block_input = n_l * c * 4 * batch
    in_flight = n_l * h * (2 if mixed else act) * batch
    if checkpointing:
        saved = other + block_input * shape.depth
        end_of_backward = grads + other + max(blocks) + block_input
    else:
        saved = other + sum(blocks)
        end_of_backward = grads + other + max(blocks)
    end_of_forward = saved + in_flight + autocast_cache
    frozen = shape.text_bytes + shape.vae_params * 4 + shape.vae_transient_per_sample * batch
    step = max(end_of_forward, end_of_backward + comm)
    return {
        "parameters": params, "gradients": grads, "optimizer": optimizer, "communication": comm,
        "activations": saved, "activations_per_sample": (saved - 0) / batch if batch else 0.0,
        "autocast_weight_cache": autocast_cache, "text_encoder": shape.text_bytes, "vae": shape.vae_params * 4,
        "vae_transient": shape.vae_transient_per_sample * batch,
        "trunk_peak": params + optimizer + step,  # the trainable transformer's step (what the CPU check measures)
        "peak": params + optimizer + step + frozen,
    }


def edit_memory(shape: Shape, batch: int, bf16: bool) -> dict[str, float]:
    """Bytes of a cached, guided edit of ``batch`` images (CFG doubles the batch; fp32 KV cache)."""
    linear = shape.block_params * shape.depth
    weights = linear * (2 if bf16 else 4) + (shape.params - linear) * 4
    kv_cache = 2 * shape.depth * 2 * batch * shape.length * shape.width * 4
    return {"weights": weights, "kv_cache": kv_cache, "text_encoder": shape.text_bytes, "vae": shape.vae_params * 4,
            "peak": weights + kv_cache + shape.text_bytes + shape.vae_params * 4 + shape.vae_transient_per_sample * batch / 2}


def largest_batch(shape: Shape, cfg: Any, checkpointing: bool, world: int, memory: int, text_tokens: int = 32) -> int:
    """The most samples per device whose step peak stays ``RESERVE_BYTES`` under ``memory``."""
    def fits(batch: int) -> bool:
        return train_memory(shape, cfg, batch, checkpointing, world, text_tokens)["peak"] + RESERVE_BYTES <= memory

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # the peak grows with the batch: bisect
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def memory_plan(cfg: Any, gpu_mem: int | None = None, gpus_per_node: int = 8, text_tokens: int = 32) -> dict[str, Any]:
    """The plan of a run config (see the module docstring); sizes in bytes."""
    shape = model_shape(cfg)
    world = _world(cfg, gpus_per_node)
    batch = int(cfg.data.batch_size)
    plan: dict[str, Any] = {
        "shape": asdict(shape), "strategy": str(cfg.trainer.strategy), "precision": str(cfg.trainer.precision),
        "world_size": world, "batch_per_device": batch, "text_tokens": text_tokens,
        "train": {"checkpointing": train_memory(shape, cfg, batch, True, world, text_tokens),
                  "no_checkpointing": train_memory(shape, cfg, batch, False, world, text_tokens)},
        "edit_batch1": edit_memory(shape, 1, bf16=str(cfg.trainer.accelerator) != "cpu"),
        "configured_checkpointing": bool(cfg.model.activation_checkpointing),
    }
    if gpu_mem:
        plan["gpu_mem"] = gpu_mem
        plan["largest_batch"] = {"checkpointing": largest_batch(shape, cfg, True, world, gpu_mem, text_tokens),
                                 "no_checkpointing": largest_batch(shape, cfg, False, world, gpu_mem, text_tokens)}
    return plan


def format_plan(plan: dict[str, Any]) -> str:
    def g(x: float) -> str:
        return f"{x / GIB:8.2f}"

    s = plan["shape"]
    lines = [f"transformer {s['params'] / 1e9:.3f} B params (depth {s['depth']}, width {s['width']}), sequence {s['length']} tokens "
             f"({s['targets']} target); text encoder {s['text_params'] / 1e9:.2f} B; VAE {s['vae_params'] / 1e6:.1f} M",
             f"{plan['strategy']} x {plan['world_size']} device(s), {plan['precision']}, batch {plan['batch_per_device']} per device",
             f"{'GiB per device':<26}{'checkpointing':>14}{'no checkpointing':>18}"]
    a, b = plan["train"]["checkpointing"], plan["train"]["no_checkpointing"]
    for key in ("parameters", "gradients", "optimizer", "communication", "autocast_weight_cache", "activations",
                "activations_per_sample", "text_encoder", "vae", "vae_transient", "peak"):
        lines.append(f"{key:<26}{g(a[key]):>14}{g(b[key]):>18}")
    e = plan["edit_batch1"]
    lines.append(f"edit (batch 1, CFG): weights {g(e['weights']).strip()} + KV cache {g(e['kv_cache']).strip()} + T5 "
                 f"{g(e['text_encoder']).strip()} + VAE {g(e['vae']).strip()} = {g(e['peak']).strip()} GiB")
    if "largest_batch" in plan:
        lb = plan["largest_batch"]
        lines.append(f"largest batch per device in {plan['gpu_mem'] / GIB:.0f} GiB (keeping {RESERVE_BYTES / GIB:.0f} GiB free): "
                     f"{lb['checkpointing']} with checkpointing, {lb['no_checkpointing']} without")
    return "\n".join(lines)


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storage while active (every storage an op creates, until freed),
    plus the tensors given at the start: an allocator-independent measurement on any device."""

    def __init__(self, existing: Any = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._keys: set[int] = set()
        for tensor in existing:
            self._add(tensor)

    def _add(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._keys:
            return
        self._keys.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._keys.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._add(tensor)
        return out


def to_json(plan: dict[str, Any]) -> str:
    return json.dumps(plan, indent=2, default=float)


def measure_train_peak(cfg: Any, batch: int, checkpointing: bool, steps: int = 2, text_len: int = 16) -> dict[str, float]:
    """Peak live bytes of ``steps`` real training steps (teacher-forced forward, bitwise loss,
    backward, AdamW) of the config's transformer on this process's device (CPU), random inputs."""
    from varedit_lab.model.loss import bitwise_loss
    from varedit_lab.model.transformer import TextFeatures

    shape = model_shape(cfg)
    arch = VAEArch.from_any(cfg.tokenizer)
    tcfg = transformer_config(cfg.model, arch.codebook_dim, arch.apply_spatial_patchify)
    text_width = _text_encoder_params(cfg)[1] if cfg.model.text_channels is None else cfg.model.text_channels
    tcfg = type(tcfg)(**{**asdict(tcfg), "text_channels": text_width, "activation_checkpointing": checkpointing})
    torch.manual_seed(0)
    model = VAREditTransformer(tcfg).train()
    if not cfg.model.cond_drop_rate:
        model.cfg_uncond.requires_grad_(False)
    schedule = ScaleSchedule.from_scales(cfg.model.scales)
    strategy = build_strategy(cfg.conditioning.name, dict(cfg.conditioning.options))
    grid = schedule.vae_grids(arch.apply_spatial_patchify)[-1]
    plan = strategy.plan(torch.randn(batch, arch.codebook_dim, *grid), schedule, cfg.model.rope_layout, arch.apply_spatial_patchify)
    channels = tcfg.token_channels
    teacher = torch.randn(batch, schedule.total - 1, channels)
    bits = torch.randint(0, 2, (batch, schedule.total, channels))
    text = TextFeatures(torch.randn(batch, text_len, text_width), torch.full((batch,), text_len))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tracker = LiveTensorPeak([*model.parameters(), teacher, bits, text.features, plan.source_tokens])
    start = tracker.live
    with tracker:
        for _ in range(steps):
            loss = bitwise_loss(model(plan, teacher, text), bits, schedule).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    inputs = sum(t.untyped_storage().nbytes() for t in (teacher, bits, text.features, plan.source_tokens))
    return {"peak": tracker.peak - inputs, "parameters": start - inputs, "length": shape.length}
