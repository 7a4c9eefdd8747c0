"""Checkpoint selection rules, on folders laid out as the trainer writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.engine.checkpoint import Checkpointer
from launcher.engine.dist import DistInfo


def make_tag(root: Path, step: int, complete: bool = True) -> None:
    d = root / f"step_{step:08d}" / "trmgpt"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step}))
    if complete:
        (d.parent / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 1,
                                                      "zero_stage": 2}))


@pytest.fixture
def ck(tmp_path: Path) -> Checkpointer:
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        make_tag(root, step, complete)
    return Checkpointer(str(root), DistInfo(0, 1, 0), keep_last=2, cache=tmp_path / "cache")


def test_latest_is_the_newest_complete_tag(ck):
    assert ck.complete_tags() == ["step_00000002", "step_00000004"]
    assert ck.find("latest").tag == "step_00000004"  # the half-written step 6 is never chosen


def test_an_older_tag_of_the_same_run_is_refused(ck):
    with pytest.raises(ValueError, match="mix two timelines"):
        ck.find(str(Path(ck.root) / "step_00000002"))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ck.find(str(Path(ck.root) / "step_00000006"))


def test_prune_keeps_the_newest_and_drops_abandoned(ck):
    make_tag(Path(ck.root), 8)
    ck.prune()
    names = sorted(p.name for p in Path(ck.root).iterdir())
    assert names == ["step_00000004", "step_00000008"]


def test_a_pickle_naming_arbitrary_code_is_refused(ck, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, Path(ck.root) / "step_00000004" / "trmgpt" / "rank_00000.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        ck.find("latest")


def test_deepspeeds_own_load_path_refuses_the_pickle_too(tmp_path):
    """The engine's checkpoint engine (what DeepSpeed calls for every *_states.pt it loads), not
    only the pre-scan: a pickle naming a callable is refused, and nothing runs. Positive control:
    a file holding DeepSpeed's own record types (an enum, a tensor) loads."""
    import pickle

    from deepspeed.runtime.zero.config import ZeroStageEnum

    from launcher.engine.safe_load import SafeTorchCheckpointEngine

    ran = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (ran,))

    bad, good = tmp_path / "bad_model_states.pt", tmp_path / "good_model_states.pt"
    torch.save({"module": Evil()}, bad)
    torch.save({"module": {"w": torch.ones(2)}, "zero_stage": ZeroStageEnum.optimizer_states},
               good)
    engine = SafeTorchCheckpointEngine(None)
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(bad), map_location="cpu")
    assert not ran.exists(), "the pickle's callable ran"
    loaded = engine.load(str(good), map_location="cpu")
    assert torch.equal(loaded["module"]["w"], torch.ones(2))
    assert loaded["zero_stage"] == ZeroStageEnum.optimizer_states
