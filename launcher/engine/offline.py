"""Evaluation and sampling from a run directory, in one process on the machine's device (a GPU
when there is one), without DeepSpeed's engine: `launcher eval` and `launcher sample`."""

from __future__ import annotations

import torch

from launcher.engine.evaluate import SUMS, VAL_SEED, eval_batch, summarize, token_bytes


def eval_run(run_dir: str, weights: str = "ema", n_batches: int = 8) -> dict:
    """Val loss per supervision step, refinement (L_1 − L_N)/L_1 and bits per byte, on the
    machine's device (a GPU when there is one)."""
    from data_pipeline import DataSpec, build_loader, load_tokenizer
    from launcher.engine.dist import device
    from launcher.engine.export import load_model
    from launcher.engine.parallelize import SupervisionStepModule

    dev = device()
    run, model = load_model(run_dir, weights)
    model.to(dev)
    t, m = run.train, run.model
    tok = load_tokenizer(t.tokenizer)
    tbytes = token_bytes(tok).to(dev)
    loader = build_loader(DataSpec.parse(t.data), tok, split="val",
                          batch_size=t.device_batch_size, seq_len=m.sequence_len, rank=0,
                          world_size=1, seed=VAL_SEED, num_workers=0, path=t.data_path)
    step_fn = SupervisionStepModule(model)
    totals = torch.zeros(m.N_sup, SUMS, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for i, (idx, tgt) in enumerate(loader):
            if i == n_batches:
                break
            totals += eval_batch(step_fn, idx.to(dev), tgt.to(dev), m.N_sup, tbytes)
    metrics = summarize(totals)
    if not metrics:
        raise ValueError(f"the validation split of {t.data!r} yielded no batch")
    return {"weights": weights, "tokens": int(totals[-1, 1].item()), **metrics}


def sample(run_dir: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 50, weights: str = "ema") -> str:
    from data_pipeline import load_tokenizer
    from launcher.engine.dist import device
    from launcher.engine.export import load_model

    dev = device()
    run, model = load_model(run_dir, weights)
    model.to(dev)
    tok = load_tokenizer(run.train.tokenizer)
    ids = tok.encode(prompt)
    idx = torch.tensor([ids[-run.model.sequence_len:]], dtype=torch.long, device=dev)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    return tok.decode(out[0].tolist())
