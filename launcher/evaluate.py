"""`launcher eval` and `launcher sample`, in one process on the run's consolidated weights."""

from __future__ import annotations

import math

import torch


def eval_run(run_dir: str, weights: str = "ema", n_batches: int = 8) -> dict:
    """Val loss per supervision step, refinement (L_1 − L_N)/L_1 and bits per byte."""
    from data_pipeline import DataSpec, build_loader, load_tokenizer
    from launcher.export import load_model
    from launcher.train import token_bytes as bytes_of

    run, model = load_model(run_dir, weights)
    t, m = run.train, run.model
    tok = load_tokenizer(t.tokenizer)
    token_bytes = bytes_of(tok)
    loader = build_loader(DataSpec.parse(t.data), tok, split="val",
                          batch_size=t.device_batch_size, seq_len=m.sequence_len, rank=0,
                          world_size=1, seed=t.seed, num_workers=0, path=t.data_path)
    sums, tokens, nbytes = [0.0] * m.N_sup, 0, 0
    with torch.no_grad():
        for i, (idx, tgt) in enumerate(loader):
            if i == n_batches:
                break
            out = model(idx, tgt)
            for s, loss in enumerate(out.step_losses):
                sums[s] += loss.item() * tgt.numel()
            tokens += tgt.numel()
            nbytes += int(token_bytes[tgt].sum())
    if tokens == 0:
        raise ValueError(f"the validation split of {t.data!r} yielded no batch")
    losses = [s / tokens for s in sums]
    return {"weights": weights, "tokens": tokens, "val_loss": losses[-1],
            "val_step_losses": losses, "val_refinement": (losses[0] - losses[-1]) / losses[0],
            "val_bpb": losses[-1] * tokens / (math.log(2) * nbytes)}


def sample(run_dir: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 50, weights: str = "ema") -> str:
    from data_pipeline import load_tokenizer
    from launcher.export import load_model

    run, model = load_model(run_dir, weights)
    tok = load_tokenizer(run.train.tokenizer)
    ids = tok.encode(prompt)
    idx = torch.tensor([ids[-run.model.sequence_len:]], dtype=torch.long)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    return tok.decode(out[0].tolist())
