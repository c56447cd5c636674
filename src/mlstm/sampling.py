"""Text generation from a trained CharLM: read a prompt, then draw one byte at a time.

    prompt bytes ─► token ids (the checkpoint's vocabulary) ─► a forward pass over the prompt ─► state, logits
    repeat `length` times:  p = softmax(logits / temperature);  id ~ p;  logits, state = model(id, state)

temperature 1 samples the model's own distribution, below 1 sharpens it, 0 is greedy (argmax). One torch.Generator
seeded with `seed` drives every draw, so a seed gives the same text on the same device and software. An empty prompt
starts from a space (or the first symbol when the vocabulary has no space), which is not part of the output.
"""

from __future__ import annotations

import numpy as np
import torch

from mlstm.errors import UserError


def symbol_table(symbols) -> bytes:
    """The vocabulary as bytes (token id i <-> byte symbols[i]) from bytes, a list or a uint8 tensor."""
    if isinstance(symbols, torch.Tensor):
        symbols = symbols.detach().cpu().tolist()
    return bytes(symbols)


def encode_prompt(prompt: bytes, symbols: bytes) -> np.ndarray:
    """Token ids of `prompt`; UserError (one line) naming the bytes the model has never seen."""
    lookup = np.full(256, -1, dtype=np.int64)
    lookup[np.frombuffer(symbols, dtype=np.uint8)] = np.arange(len(symbols))
    data = np.frombuffer(prompt, dtype=np.uint8)
    ids = lookup[data]
    unknown = np.unique(data[ids < 0])
    if unknown.size:
        shown = ", ".join(repr(bytes([b])) for b in unknown[:8])
        raise UserError(
            f"the prompt holds {unknown.size} byte value(s) outside the model's {len(symbols)}-symbol "
            f"vocabulary ({shown}); use only characters of the training corpus"
        )
    return ids


@torch.no_grad()
def sample(
    model,
    symbols,
    prompt: bytes | str,
    length: int,
    temperature: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> bytes:
    """`length` bytes generated after `prompt` (the prompt itself is not returned)."""
    symbols = symbol_table(symbols)
    if isinstance(prompt, str):
        prompt = prompt.encode("utf-8")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise UserError(f"length={length!r} must be an integer >= 0")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise UserError(f"temperature={temperature!r} must be a number >= 0 (0 = greedy)")
    if len(symbols) != model.decoder.out_features:
        raise UserError(
            f"the vocabulary has {len(symbols)} symbols but the model predicts "
            f"{model.decoder.out_features}; the checkpoint is inconsistent"
        )
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    ids = encode_prompt(prompt, symbols) if prompt else encode_prompt(b" " if b" " in symbols else symbols[:1], symbols)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(int(seed))
    state = model.init_state(1, device)
    tokens = torch.as_tensor(ids, dtype=torch.int64, device=device).view(-1, 1)  # (T, 1)
    logits, state = model(tokens, state)
    out = torch.empty(length, dtype=torch.int64, device=device)
    for t in range(length):
        last = logits[-1, 0].float()  # (V,)
        if temperature == 0:
            next_id = last.argmax().view(1)
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        out[t] = next_id[0]
        if t + 1 < length:
            logits, state = model(next_id.view(1, 1), state)
    model.train(was_training)
    table = np.frombuffer(symbols, dtype=np.uint8)
    return table[out.cpu().numpy()].tobytes()
