"""`launcher eval` on a run directory laid out as the trainer writes it (the EMA shard of one
rank): bits per byte leaves out targets that stand for no text (EOS between the documents of the
validation set), and evaluation holds one supervision step's logits at a time, not N_sup."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "tests" / "assets"
N_SUP, BATCH, SEQ, BATCHES = 6, 2, 32, 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run with one complete checkpoint holding the EMA of a freshly built tiny model; its
    validation split is short speeches, one document each, so EOS is a frequent target."""
    from data_pipeline import load_tokenizer
    from launcher.engine.config import resolve
    from model import RecursiveGPT

    root = tmp_path_factory.mktemp("eval")
    spec = root / "spec.yaml"
    spec.write_text(f"name: speeches\nsources:\n  - path: {ASSETS}/shakespeare/train/*.txt\n"
                    f"val_sources:\n  - path: {ASSETS}/othello_speeches.jsonl\n")
    tok = load_tokenizer(REPO / "configs" / "tokenizers" / "shakespeare-4k")
    run = resolve("tiny", {"N_sup": N_SUP, "sequence_len": SEQ, "vocab_size":
                           tok.padded_vocab_size, "device_batch_size": BATCH,
                           "data": str(spec), "data_path": "stream"})
    torch.manual_seed(0)
    model = RecursiveGPT(run.model)
    tag = root / "checkpoints" / "step_00000001"
    (tag / "trmgpt").mkdir(parents=True)
    params = dict(model.named_parameters())
    state = {"step": 1, "config": run.to_dict(),
             "ema": {"layout": "full", "num_updates": 1,
                     "numel": {n: p.numel() for n, p in params.items()},
                     "shape": {n: list(p.shape) for n, p in params.items()}}}
    (tag / "trmgpt" / "state.json").write_text(json.dumps(state))
    torch.save({"ema": {n: p.detach().clone() for n, p in params.items()}},
               tag / "trmgpt" / "rank_00000.pt")
    (tag / "trmgpt" / "rank_00000.json").write_text("{}")
    (tag / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": 1, "zero_stage": 0}))
    run.save(root / "config.json")
    return root


def ema_model_by_hand(run_dir: Path):
    """(run config, model) with the EMA weights read straight from the rank file the fixture
    wrote, not through launcher.engine.export.load_model (the code under test)."""
    from launcher.engine.config import RunConfig
    from model import RecursiveGPT

    run = RunConfig.load(run_dir / "config.json")
    model = RecursiveGPT(run.model)
    ema = torch.load(run_dir / "checkpoints" / "step_00000001" / "trmgpt" / "rank_00000.pt",
                     weights_only=True)["ema"]
    model.load_state_dict(ema)
    return run, model.eval()


def reference(run_dir: Path) -> tuple[list[float], float, int]:
    """Step losses and bits per byte computed by hand, with the whole forward kept."""
    from data_pipeline import DataSpec, build_loader, load_tokenizer
    from launcher.engine.evaluate import token_bytes

    run, model = ema_model_by_hand(run_dir)
    tok = load_tokenizer(run.train.tokenizer)
    nbytes_of = token_bytes(tok)
    loader = build_loader(DataSpec.parse(run.train.data), tok, split="val", batch_size=BATCH,
                          seq_len=SEQ, rank=0, world_size=1, seed=run.train.seed, num_workers=0,
                          path=run.train.data_path)
    ce_steps, ce_text, nbytes, eos = [0.0] * N_SUP, 0.0, 0, 0
    with torch.no_grad():
        for i, (idx, tgt) in enumerate(loader):
            if i == BATCHES:
                break
            out = model(idx, tgt)
            b = nbytes_of[tgt]
            eos += int((b == 0).sum())
            for s, logits in enumerate(out.step_logits):
                ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(),
                                                       reduction="none").double()
                ce_steps[s] += ce.sum().item()
                if s == N_SUP - 1:
                    ce_text += ce[b.flatten() > 0].sum().item()
                    nbytes += int(b.sum())
    n = BATCHES * BATCH * SEQ
    return [c / n for c in ce_steps], ce_text / (math.log(2) * nbytes), eos


class LiveLogits(TorchDispatchMode):
    """The most tensors of (B, T, vocab) elements alive at once, counted by storage."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.live, self.most = numel, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                self.live.append(weakref.ref(t))
        self.live = [r for r in self.live if r() is not None]
        self.most = max(self.most, len({r().untyped_storage().data_ptr() for r in self.live}))
        return out


def test_bits_per_byte_leaves_out_eos_targets(run_dir):
    from launcher.engine.offline import eval_run

    losses, bpb, eos = reference(run_dir)
    assert eos >= 2, "the validation batches should hold EOS targets"
    got = eval_run(str(run_dir), "ema", n_batches=BATCHES)
    torch.testing.assert_close(torch.tensor(got["val_step_losses"]), torch.tensor(losses),
                               rtol=1e-5, atol=0)
    assert got["val_bpb"] == pytest.approx(bpb, rel=1e-5)


def test_eval_holds_one_steps_logits_at_a_time(run_dir):
    from launcher.engine.offline import eval_run

    vocab = json.loads((run_dir / "config.json").read_text())["model"]["vocab_size"]
    with LiveLogits(BATCH * SEQ * vocab) as mode:
        eval_run(str(run_dir), "ema", n_batches=1)
    # the step's logits, the soft-cap's tanh of them and cross entropy's log-softmax; all
    # N_sup steps' would be 6+
    assert mode.most <= 3, f"{mode.most} logits-sized tensors alive at once"


def test_sample_runs_on_the_run_weights(run_dir):
    from data_pipeline import load_tokenizer
    from launcher.engine.offline import sample
    from model import RecursiveGPT

    out = sample(str(run_dir), "ROMEO:", max_new_tokens=4, temperature=0)
    # greedy decoding of the run's EMA weights, by hand: the same text
    run, model = ema_model_by_hand(run_dir)
    tok = load_tokenizer(run.train.tokenizer)
    idx = torch.tensor([tok.encode("ROMEO:")])
    want = tok.decode(model.generate(idx, 4, temperature=0)[0].tolist())
    assert out == want, (out, want)
    # and other weights would have said something else
    torch.manual_seed(1)
    other = RecursiveGPT(run.model)
    assert tok.decode(other.generate(idx, 4, temperature=0)[0].tolist()) != want
