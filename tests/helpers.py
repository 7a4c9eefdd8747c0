"""What many test modules share, in one place: paths, the environment a subprocess of the product
gets, the `python -m launcher` and `make` runners, metrics.jsonl readers, the three-line spec of
the test plays, the small `tiny` overrides and random-token batches.

Imported as `from tests.helpers import ...`; torch is imported only inside the functions that
need it, so modules that never touch the model do not pay for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "tests" / "assets" / "shakespeare"
TOKENIZER = REPO / "configs" / "tokenizers" / "shakespeare-4k"
BIN = REPO / ".venv" / "bin"

# `tiny` cut down for engine tests: short sequences, a tiny vocabulary, 2 sequences per rank
SMALL_TINY: dict[str, Any] = {"sequence_len": 32, "device_batch_size": 2, "vocab_size": 256}


def product_env(**extra: str) -> dict[str, str]:
    """The environment a product subprocess (launcher, data pipeline, bench) gets in tests:
    this checkout on PYTHONPATH, wandb off, DeepSpeed on the CPU accelerator, one thread each,
    no fault injection unless asked, hubs offline."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    env.pop("TRMGPT_FAULTS", None)
    env.update(extra)
    return env


def run_launcher(*args: str, check: bool = True, timeout: float = 900,
                 **extra_env: str) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` from the repo root; raises with its output when check and it
    fails."""
    res = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO,
                         env=product_env(**extra_env), capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"launcher {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def run_make(*args: str, dry: bool = False, timeout: float = 120,
             **env: str | None) -> subprocess.CompletedProcess:
    """`make ARGS` in the repo, treating the install stamp as up to date (this checkout's venv
    is already installed) unless ARGS hold -B (a dry run of every recipe). env: variables to
    set, or to remove where the value is None."""
    keep = [] if "-B" in args else ["-o", ".venv/.installed"]
    cmd = ["make", "--no-print-directory", *keep, *(["-n"] if dry else []), *args]
    e = {**os.environ, "HOME": os.environ.get("HOME", "/tmp"), **env}
    e = {k: v for k, v in e.items() if v is not None}
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl's training rows (those with a loss), by step."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if x.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def read_losses(run_dir: Path) -> dict[int, list[float]]:
    """Each training step's supervision-step losses, by step."""
    return {s: r["step_losses"] for s, r in read_metrics(run_dir).items()}


def assets_spec(root: Path, name: str = "spec.yaml") -> Path:
    """A data spec of the committed test plays (train and val splits), written under root."""
    spec = Path(root) / name
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(f"name: assets\nsources:\n  - path: {ASSETS}/train/*.txt\n"
                    f"val_sources:\n  - path: {ASSETS}/val/*.txt\n")
    return spec


def random_batch(seed: int, vocab: int = 256, batch: int = 2, seq: int = 32):
    """(inputs, targets) of seeded random token ids, shape (batch, seq) each."""
    import torch

    ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def per_step_backward(model, idx, targets, keep_logits: bool = False) -> list[float]:
    """The step losses, backpropagating each supervision step as soon as it finishes (the
    launcher's path). Gradients accumulate in .grad; no optimizer step."""
    y = z = prev = None
    losses = []
    for s in range(model.config.N_sup):
        st = model.supervision_step(idx, y, z, targets, step=s, prev_loss=prev,
                                    keep_logits=keep_logits)
        st.objective.backward()
        y, z, prev = st.y, st.z, st.loss.detach()
        losses.append(st.loss.item())
    return losses
