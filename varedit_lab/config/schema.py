"""Structured run configuration: one dataclass per concern.

The YAML files under ``experiments/`` and ``key=value`` overrides are merged into these schemas by
:func:`varedit_lab.config.load_config`; OmegaConf then checks every key and type. This module imports
nothing heavy so that ``varedit-lab config show`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional


def at_least(low: float, default: Any, high: float | None = None) -> Any:
    """A field whose value must be >= ``low`` (and <= ``high``); checked by ``config.validate``."""
    return field(default=default, metadata={"min": low, "max": high})


@dataclass
class ModelConfig:
    """The editing transformer. ``None`` fields are filled from ``preset``."""

    preset: str = "tiny"  # a name in varedit_lab.model.presets.PRESETS: tiny | infinity_2b | infinity_8b
    depth: Optional[int] = at_least(1, None)
    width: Optional[int] = at_least(1, None)
    num_heads: Optional[int] = at_least(1, None)
    mlp_ratio: Optional[float] = at_least(0.0625, None)
    text_channels: Optional[int] = None  # width of the text features (2048 for flan-t5-xl)
    text_maxlen: Optional[int] = None  # rows of the learned unconditional text (512 released)
    # Square token grids, coarse to fine. The released 256 px schedule is [1, 2, 4, 6, 8, 12, 16].
    scales: List[int] = field(default_factory=lambda: [1, 2, 4, 6, 8, 12, 16])
    # reference_compat: the released RoPE table (1M schedule, sliced; needed by released weights).
    # paper: 2-D star positions, source at the finest grid + (64, 64) (the paper's Eq. 9-10).
    rope_layout: Literal["paper", "reference_compat"] = "paper"
    # blockwise: one SDPA call per query block over exactly its visible keys (no padding, no mask);
    # masked: one SDPA call with a boolean token mask.
    attention: Literal["blockwise", "masked"] = "blockwise"
    drop_path_rate: float = at_least(0.0, 0.0, high=0.99)
    cond_drop_rate: float = at_least(0.0, 0.1, high=1.0)  # text-only condition dropout (training mode only)
    activation_checkpointing: bool = False  # per block
    compile_blocks: bool = False  # torch.compile each block
    init_from: Optional[str] = None  # released VAREdit/Infinity .pth to fine-tune from (strict load)


@dataclass
class TokenizerConfig:
    """The visual tokenizer (BSQ VAE). ``checkpoint`` points at a trained or released VAE."""

    checkpoint: Optional[str] = None
    codebook_dim: int = at_least(1, 16)  # d: bits per VAE position
    patch_size: int = at_least(1, 8)  # VAE stride (8 or 16)
    base_ch: int = at_least(1, 32)
    encoder_ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 4])
    decoder_ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    apply_spatial_patchify: bool = False  # 2x2 pixel_unshuffle into transformer tokens (8B style)
    # Tokenizer training only (task=tokenizer; see varedit_lab.tokenizer.module).
    l1_loss_weight: float = 1.0  # pixel reconstruction through all scales
    l2_loss_weight: float = 1.0
    entropy_loss_weight: float = 0.01  # BSQ entropy (H_sample - gamma * H_codebook) / inv_temperature
    codebook_entropy_gamma: float = 1.0
    entropy_inv_temperature: float = 100.0
    commitment_loss_weight: float = 0.25  # BSQ per-scale ||u - sg(q)||^2 on the normalised residual
    latent_commitment_weight: float = 0.0  # ||z - sg(summed codes)||^2 on the whole latent
    cycle_loss_weight: float = 0.0  # ||E(D(z_q)) - sg(z)||^2: bits -> decode -> encode keeps the bits
    straight_through: Literal["scales", "global"] = "scales"  # scales (the quantiser's per-scale STE) | global (z + sg(z_q - z))
    zero_init_residual: bool = True  # residual branches start at zero (from-scratch training)
    channels_last: bool = True  # NHWC convolutions (faster on CPU)
    scales: List[int] = field(default_factory=lambda: [1, 2, 4, 6, 8])


@dataclass
class TextConfig:
    """The text encoder. ``t5``: frozen T5 from a local HF folder (flan-t5-xl) or a tiny random T5 built
    from config. ``words``: a small trainable encoder over a fixed vocabulary (the synthetic benchmark's
    instruction words, ``vocab.txt`` from ``data synth``), trained with the editor."""

    kind: Literal["t5", "words"] = "t5"
    path: Optional[str] = None  # local T5 folder; None builds the tiny random encoder below
    vocabulary: Optional[str] = None  # kind=words: one word per line
    words_width: int = at_least(8, 128)
    words_layers: int = at_least(1, 2)
    words_heads: int = at_least(1, 4)
    max_length: int = at_least(1, 512)
    tiny_d_model: int = 128
    tiny_num_layers: int = 2
    tiny_num_heads: int = 4
    tiny_d_ff: int = 256
    tiny_seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class ConditioningConfig:
    """Which source-conditioning strategy and its options (validated by the strategy itself)."""

    name: str = "sar"  # registered name or "package.module:Class"
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Edit shards (see varedit_lab.data). A shard spec is a brace pattern ("dir/train-{000000..000007}.tar",
    several joined by "::"), a directory (all *.tar), pipe:/http: URLs, or a list of these."""

    train_shards: Optional[Any] = None  # needs >= world_size x max(1, num_workers) shards
    val_shards: Optional[Any] = None
    test_shards: Optional[Any] = None
    image_size: int = at_least(8, 64)  # resize to cover + centre-crop to this square
    batch_size: int = at_least(1, 16)  # per rank (validation/test too)
    num_workers: int = at_least(0, 0)
    batches_per_epoch: int = at_least(1, 100)  # nominal epoch length per rank (training resamples shards)
    shuffle_buffer: int = 256  # samples; <= 1 disables
    val_samples: int = at_least(0, 16)  # fixed validation list (first N good samples, 0 = all), equal on every rank
    test_samples: int = at_least(0, 0)  # fixed test list, as val_samples (0 = all)
    min_side: int = at_least(1, 8)  # an image with a shorter side is a bad sample
    strict: bool = False  # raise on a bad sample instead of counting and skipping it
    # Keep each training sample's tokenizer latents in memory by sample key (needs keys that are
    # unique across shards, as `data synth` writes them): for small datasets such as the benchmark.
    cache_latents: bool = False


@dataclass
class LossConfig:
    reweight_by_scale: bool = True  # the release's sqrt(S / n_s) per-token weights
    label_smoothing: float = at_least(0.0, 0.0, high=0.99)
    # Bitwise self-correction (target inputs only; labels stay clean). Infinity pre-training used
    # 13 scales at strength 0.3; the VAREdit paper is silent (off by default).
    bsc_scales: int = at_least(0, 0)
    bsc_strength: float = at_least(0.0, 0.3, high=1.0)


@dataclass
class OptimConfig:
    lr: float = at_least(0.0, 3e-4)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.97])
    weight_decay: float = at_least(0.0, 0.005)
    warmup_steps: int = at_least(0, 50)
    schedule: Literal["constant", "cosine"] = "constant"  # constant (after warm-up, as the reference trains) | cosine
    min_lr_ratio: float = at_least(0.0, 0.1, high=1.0)  # cosine floor as a fraction of lr
    grad_clip: float = at_least(0.0, 5.0)
    ema_decay: Optional[float] = None  # e.g. 0.999; None disables the EMA copy


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = at_least(-1, 1)  # -1: every visible GPU
    num_nodes: int = at_least(1, 1)
    # fsdp: Lightning FSDPStrategy (FSDP1, GPUs); fsdp2: FSDP2 fully_shard (see varedit_lab.distributed)
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp", "fsdp2"] = "auto"
    precision: str = "32-true"
    max_steps: int = at_least(1, 200)
    val_every_n_steps: int = at_least(1, 100)
    log_every_n_steps: int = at_least(1, 10)
    accumulate_grad_batches: int = at_least(1, 1)
    deterministic: bool = False
    num_threads: Optional[int] = at_least(1, None)  # torch intra-op threads per process
    progress_bar: bool = True
    checkpoint_every_n_steps: int = at_least(1, 100)  # periodic last.ckpt (for resume)
    checkpoint_monitor: Optional[str] = "val/loss"  # best checkpoint by this metric (None: off)
    checkpoint_mode: Literal["min", "max"] = "min"
    # Any other ``lightning.Trainer`` argument (limit_val_batches, overfit_batches, profiler, ...),
    # checked against its signature at config load; the keys above are set through their own fields.
    extra: Dict[str, Any] = field(default_factory=dict)
    # Extra callbacks by class path: [{class_path: lightning.pytorch.callbacks.EarlyStopping,
    # init_args: {monitor: val/loss}}], built after varedit-lab's own.
    callbacks: List[Any] = field(default_factory=list)


@dataclass
class LoggerConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "varedit-lab"
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    log_images: bool = True
    # Checkpoints as W&B artifacts (WandbLogger's log_model): false | true (at the end) | all (each save).
    log_model: str = "false"


@dataclass
class SamplingConfig:
    """Decoding settings for validation edits and `varedit-lab edit`."""

    cfg: float = 4.0
    tau: float = at_least(1e-6, 0.5)
    top_k: int = at_least(0, 0)  # a no-op on 2-class bits; kept for parity with the release
    top_p: float = at_least(0.0, 0.97, high=1.0)
    greedy: bool = False
    num_val_edits: int = at_least(0, 8)


@dataclass
class ProbesConfig:
    """Live attention probes (varedit_lab.probes.ProbeCallback): every ``every_n_val``-th validation, on
    the first ``num_samples`` validation samples; writes {run}/probes/stepNNNNNN/ and logs to W&B."""

    every_n_val: int = 0  # 0 disables the live probe callback (editor runs only)
    layers: List[int] = field(default_factory=list)  # empty = every layer
    heads: List[int] = field(default_factory=list)  # empty = every head
    radius: float = 1.0  # locality radius in finest-source tokens
    num_samples: int = 2
    map_layers: Optional[List[int]] = None  # full maps for the paper-style image; null = first and last probed, [] = none
    log_images: bool = True  # PNGs on disk and to the loggers (scalars are always logged)


@dataclass
class RunConfig:
    task: Literal["editor", "tokenizer"] = "editor"
    name: Optional[str] = None  # run name; default derived from the config
    seed: int = 0
    output_dir: str = "runs"
    resume: Optional[str] = None  # a checkpoint path, or "auto" (last.ckpt of this run)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text: TextConfig = field(default_factory=TextConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
