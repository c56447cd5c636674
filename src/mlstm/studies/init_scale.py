"""How large is each cell's output h at initialisation? (Why the seed form starts so slowly.)

The seed cell outputs h = tanh(c ⊙ o) with no sigmoid on o: at initialisation both c and the raw pre-activation o are
small, so h is their product, and its multiplicative input m = a ⊙ b is itself a product of two small affine maps.
This feeds the same random bytes through a freshly initialised layer of every form and prints the RMS of h and
c over a segment, with the default config (orthogonal init, 64-dim embedding as in the CPU convergence study).

The logic of `scripts/init_scale.py`.
"""

from __future__ import annotations

import torch

from mlstm.config import load_config
from mlstm.model import build_model

CELLS = [
    ("lstm", ["cell=lstm"]),
    ("mlstm-paper", ["cell=mlstm", "cell.form=paper"]),
    ("mlstm-matlab", ["cell=mlstm", "cell.form=matlab"]),
    ("mlstm-seed", ["cell=mlstm", "cell.form=seed"]),
]


def output_scale(overrides: list[str], seed: int, steps: int = 100, batch: int = 32) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = build_model(load_config(overrides), vocab_size=205)
    tokens = torch.randint(0, 205, (steps, batch))
    with torch.no_grad():
        h, (_, c) = model.layers[0](model.embed(tokens), model.init_state(batch)[0])
    return h.pow(2).mean().sqrt().item(), c.pow(2).mean().sqrt().item()


def report(hidden: str = "406,446,500", seeds: int = 3, embedding: int = 64) -> str:
    """The markdown table for comma-separated hidden sizes, every cell, `seeds` seeds each."""
    lines = ["| cell | hidden | RMS of h (mean over seeds) | RMS of c at the end |", "| --- | --- | --- | --- |"]
    for size in (int(h) for h in hidden.split(",")):
        for name, overrides in CELLS:
            cfg = overrides + [f"cell.hidden_size={size}", f"model.embedding_size={embedding}"]
            scales = [output_scale(cfg, seed) for seed in range(seeds)]
            h_rms = sum(s[0] for s in scales) / len(scales)
            c_rms = sum(s[1] for s in scales) / len(scales)
            lines.append(f"| {name} | {size} | {h_rms:.2e} | {c_rms:.2e} |")
    return (
        f"Freshly initialised layers (default config: orthogonal init, embedding {embedding}), 32 streams x "
        f"100 random bytes, {seeds} seeds.\n\n" + "\n".join(lines) + "\n"
    )
