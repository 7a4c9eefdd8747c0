"""Loading checkpoints without unpickling arbitrary objects.

DeepSpeed's own loaders call torch.load(weights_only=False). Every checkpoint file we load goes
through weights_only=True with an allowlist of exactly the three DeepSpeed types its files hold
(an enum, the loss-scaler record and a fragment-address tuple); files read by DeepSpeed tools we
cannot redirect (ds_to_universal) are scanned first and refused if they reference anything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from launcher.engine.dist import choose_accelerator

choose_accelerator()  # before deepspeed's first import: it fixes its accelerator then
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

SAFE_GLOBALS = [ZeroStageEnum, LossScaler, fragment_address]
SAFE_NAMES = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True, allowing only DeepSpeed's known record types."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def verify_checkpoint_files(folder: str | Path) -> None:
    """Refuse a checkpoint folder whose pickles name any global outside the allowlist."""
    for f in sorted(Path(folder).rglob("*.pt")):
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - SAFE_NAMES
        if unsafe:
            raise ValueError(f"refusing to load {f}: it references {sorted(unsafe)}, which "
                             "weights-only loading does not allow")


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location)
