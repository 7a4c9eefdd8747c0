"""Run configuration: a preset (configs/presets/*.yaml) plus overrides, resolved and validated.

One override syntax: `--set key=value` or `--key value` / `--key=value` for any key of GPTConfig
or TrainConfig, plus the nanochat-style aliases (`--depth` is n_layer). Unknown keys and broken
rules are refused here, before anything is started or provisioned.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model import GPTConfig
from model.config import coerce

REPO = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO / "configs" / "presets"
ALIASES = {"depth": "n_layer"}  # nanochat's flag names that differ from ours


@dataclass
class TrainConfig:
    """Everything about how a model is trained (the model's shape lives in GPTConfig)."""

    # batch
    device_batch_size: int = 8
    """Sequences per rank per micro-batch."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks; 0 = device_batch_size × world size. Kept
    across a resume on another world size, which then changes the gradient accumulation."""
    update_mode: Literal["accumulate", "per_step"] = "accumulate"
    """accumulate: one optimizer step per batch over all N_sup steps; per_step: TRM style, an
    optimizer step after every supervision step."""
    # engine
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0/1/2/3."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 where the device has it (CUDA), else fp32; fp16 uses dynamic loss scaling."""
    activation_checkpointing: bool = False
    """Recompute each graded application of the shared stack in backward."""
    checkpoint_impl: Literal["torch", "deepspeed"] = "torch"
    """torch.utils.checkpoint (non-reentrant) or deepspeed.checkpointing.checkpoint."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    compile: bool = False
    """torch.compile the shared stack (GPU runs)."""
    # optimizer: AdamW with one learning rate per parameter group
    matrix_lr: float = 3e-4
    """Matrices of the shared stack."""
    embedding_lr: float = 3e-4
    """Token embedding."""
    lm_head_lr: float = 3e-4
    """Output projection."""
    scalar_lr: float = 3e-4
    """Norm weights, initial states, halting head (no weight decay)."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices and lm_head (not embeddings, norms or scalars)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    global_batch_tokens: int = 0
    """Recipes: the global batch in tokens; sets global_batch_size = this / sequence_len (when
    global_batch_size is not given)."""
    # schedule
    max_steps: int = 1000
    """Training batches (one optimizer step each in accumulate mode). A recipe with a
    token_budget derives it (token_budget / tokens per batch) unless it is given."""
    token_budget: int = 0
    """Recipes: training tokens; 0 = max_steps decides."""
    warmup_steps: int = 100
    warmdown: Literal["constant", "cosine", "linear"] = "cosine"
    """Shape after warm-up: stay constant, or decay over the last warmdown_frac of training.
    linear with a small warmdown_frac is warmup-stable-decay (WSD): the lr stays at its peak
    until the last warmdown_frac, so a run resumed with a larger max_steps before its decay
    began continues on the same schedule (launcher/jobs/cli.py lr_note)."""
    warmdown_frac: float = 0.5
    final_lr_frac: float = 0.1
    # EMA, eval, checkpoints, logging
    ema_decay: float = 0.999
    checkpoint_every: int = 100
    checkpoint_dir: str = ""
    """Where checkpoints go: a local path or an fsspec URL (s3://bucket/run, gs://...); empty is
    RUN_DIR/checkpoints. Remote checkpoints are staged under $TRMGPT_CACHE and uploaded."""
    keep_last: int = 3
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    seed: int = 1337
    max_nonfinite: int = 3
    """Non-finite losses in a row before the run stops (each one is skipped and counted)."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 = look up the GPU, none on CPU."""
    # data
    data: str = "shakespeare"
    """Data spec: a name, path/glob/URL, spec file, or a pre-tokenized directory. `$STORAGE/...`
    is under $TRMGPT_STORAGE, $STORAGE or the repo's storage/ folder."""
    data_path: Literal["auto", "stream", "pretok"] = "auto"
    data_spec: str = ""
    """Recipes: the raw corpus (configs/data/*.yaml) `make data` tokenizes into `data`."""
    tokenizer: str = "configs/tokenizers/shakespeare-4k"
    """The tokenizer folder (or tokenizer.json); the model's vocab_size follows it (padded to a
    multiple of 64) unless vocab_size is given."""
    tokenizer_data: str = ""
    """Recipes: the spec whose sample `make tokenizer` trains `tokenizer` on."""
    tokenizer_vocab: int = 0
    """Recipes: the vocabulary `make tokenizer` trains (VOCAB=)."""
    num_workers: int = 0
    """DataLoader workers per rank for the streaming path."""
    wandb_project: str = "trmgpt"

    def validate(self, world_size: int = 1) -> None:
        positive = ["device_batch_size", "max_steps", "checkpoint_every", "keep_last",
                    "eval_every", "eval_batches", "log_every", "max_nonfinite"]
        for k in positive:
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        for k in ("matrix_lr", "embedding_lr", "lm_head_lr", "scalar_lr"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        for k in ("weight_decay", "grad_clip", "warmup_steps", "peak_flops", "num_workers",
                  "token_budget", "global_batch_tokens", "tokenizer_vocab"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.warmdown_frac <= 1 or not 0 <= self.final_lr_frac <= 1:
            raise ValueError("warmdown_frac and final_lr_frac must be in [0, 1]")
        choices = {"update_mode": ("accumulate", "per_step"),
                   "precision": ("auto", "fp32", "bf16", "fp16"),
                   "checkpoint_impl": ("torch", "deepspeed"),
                   "warmdown": ("constant", "cosine", "linear"),
                   "data_path": ("auto", "stream", "pretok")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ValueError(f"{k} must be one of {allowed}, got {getattr(self, k)!r}")
        self.grad_accum(world_size)

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step."""
        per_micro = self.device_batch_size * world_size
        gbs = self.global_batch_size or per_micro
        if gbs % per_micro:
            raise ValueError(f"global_batch_size ({gbs}) must be divisible by device_batch_size "
                             f"× world size ({self.device_batch_size} × {world_size})")
        return gbs // per_micro


@dataclass
class RunConfig:
    preset: str
    model: GPTConfig
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "model": self.model.to_dict(),
                "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        train = build_train_config(d.get("train", {}))
        return cls(preset=d["preset"], model=GPTConfig.from_dict(d["model"]), train=train)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def build_train_config(d: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown train key(s) {unknown}")
    cfg = TrainConfig(**{k: coerce(TrainConfig, k, v) for k, v in d.items()})
    return cfg


def parse_overrides(sets: list[str], extra: list[str]) -> dict[str, str]:
    """`--set k=v` items plus leftover `--k v` / `--k=v` flags -> {key: string value}."""
    out: dict[str, str] = {}
    for s in sets:
        if "=" not in s:
            raise ValueError(f"--set expects key=value, got {s!r}")
        k, v = s.split("=", 1)
        out[k.strip()] = v.strip()
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            i += 1
            val = extra[i]
        else:
            val = "true"  # a bare flag such as --compile
        out[key.replace("-", "_")] = val
        i += 1
    return out


def resolve(preset: str, overrides: dict[str, Any] | None = None,
            world_size: int = 1) -> RunConfig:
    """Preset file + overrides -> a validated RunConfig. Every key goes to the model or the
    trainer; one that fits neither is refused with the list of keys."""
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"unknown preset {preset!r}; choose one of {names}")
    spec = yaml.safe_load(path.read_text())
    model_keys = GPTConfig.field_names()
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    m_over: dict[str, Any] = {}
    t_over: dict[str, Any] = dict(spec.get("train", {}))
    for k, v in (overrides or {}).items():
        k = ALIASES.get(k, k)
        if k in model_keys:
            m_over[k] = v
        elif k in train_keys:
            t_over[k] = v
        else:
            raise ValueError(f"unknown config key {k!r}; model keys: {sorted(model_keys)}; "
                             f"train keys: {sorted(train_keys)}")
    train_cfg = build_train_config(t_over)
    train_cfg.data = expand_storage(train_cfg.data)
    train_cfg.tokenizer = expand_storage(train_cfg.tokenizer)
    if "vocab_size" not in m_over and (n := tokenizer_vocab(train_cfg.tokenizer)):
        m_over["vocab_size"] = n  # the model's vocabulary follows its tokenizer (padded)
    model_cfg = GPTConfig.preset(spec["model"], **m_over)
    apply_recipe(train_cfg, model_cfg.sequence_len, explicit=set(t_over))
    train_cfg.validate(world_size)
    return RunConfig(preset=preset, model=model_cfg, train=train_cfg)


def expand_storage(path: str) -> str:
    from data_pipeline.datajob import expand_storage as expand

    return expand(path)


def tokenizer_vocab(path: str) -> int:
    """The padded vocabulary of the tokenizer at `path` (relative paths: to the repo), or 0
    when it is not there (yet): `check_inputs` refuses a run without it."""
    import os

    from data_pipeline import load_tokenizer

    if "://" not in path and not os.path.isabs(path):
        path = str(REPO / path)
    try:
        return load_tokenizer(path).padded_vocab_size
    except (FileNotFoundError, OSError, ValueError):
        return 0


def apply_recipe(t: TrainConfig, seq_len: int, explicit: set[str]) -> None:
    """global_batch_tokens -> global_batch_size, token_budget -> max_steps (unless given)."""
    if t.global_batch_tokens and "global_batch_size" not in explicit:
        if t.global_batch_tokens % seq_len:
            raise ValueError(f"global_batch_tokens ({t.global_batch_tokens}) must be a multiple "
                             f"of sequence_len ({seq_len})")
        t.global_batch_size = t.global_batch_tokens // seq_len
    if t.token_budget and "max_steps" not in explicit:
        if not t.global_batch_size:
            raise ValueError("token_budget needs global_batch_tokens or global_batch_size")
        t.max_steps = -(-t.token_budget // (t.global_batch_size * seq_len))


def recipe_commands(run: RunConfig) -> dict[str, str]:
    """The make commands that produce a recipe's tokenizer and data."""
    t = run.train
    tok_dir = t.tokenizer[:-len("/tokenizer.json")] if t.tokenizer.endswith(
        "/tokenizer.json") else t.tokenizer
    out = {}
    if t.tokenizer_data:
        out["tokenizer"] = (f"make tokenizer DATA={t.tokenizer_data} VOCAB="
                            f"{t.tokenizer_vocab or run.model.vocab_size} OUT={tok_dir}")
    if t.data_spec:
        out["data"] = f"make data DATA={t.data_spec} TOKENIZER={tok_dir} OUT={t.data}"
    return out


def check_inputs(run: RunConfig) -> dict | None:
    """Refuse a run whose tokenizer or data is not there, before anything is provisioned, with
    the make target that makes it. Pre-tokenized data must be a finished `make data` output for
    this very tokenizer (its manifest is checked: shards, sizes, tokenizer hash). Returns the
    manifest (None for raw data, which the loaders probe themselves)."""
    import os

    from data_pipeline import load_tokenizer
    from data_pipeline.datajob import check_tokenized

    t = run.train
    cmds = recipe_commands(run)
    storage = ("" if os.environ.get("TRMGPT_STORAGE") or os.environ.get("STORAGE") else
               " ($STORAGE is not set: that is the local storage/ folder; set STORAGE=s3://... "
               "to use the cluster's)")
    tok_path = t.tokenizer if "://" in t.tokenizer or os.path.isabs(t.tokenizer) else str(
        REPO / t.tokenizer)
    try:
        tok = load_tokenizer(tok_path)
    except FileNotFoundError:
        how = f"make it with `{cmds['tokenizer']}`" if "tokenizer" in cmds else (
            "train one with `make tokenizer DATA=<spec> VOCAB=<n> OUT=<folder>`")
        raise FileNotFoundError(f"preset {run.preset}: tokenizer {t.tokenizer} is missing"
                                f"{storage}; {how}") from None
    if tok.vocab_size > run.model.vocab_size:
        raise ValueError(f"vocab_size ({run.model.vocab_size}) is smaller than the tokenizer's "
                         f"vocabulary ({tok.vocab_size}); set vocab_size={tok.padded_vocab_size}")
    data = t.data if "://" in t.data or os.path.isabs(t.data) or not t.data_spec else str(
        REPO / t.data)
    if not t.data_spec:
        return None  # raw data or a folder given by hand: the loader's own checks apply
    hint = f"make it with `{cmds['data']}`"
    try:
        return check_tokenized(data, tok, make_hint=hint + storage)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"preset {run.preset}: {e}") from None
    except ValueError as e:
        raise ValueError(f"preset {run.preset}: {e}") from None
