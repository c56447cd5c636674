"""CharLM: bytes in, next-byte logits out.

    tokens (T, B) ─► one-hot or embedding (T, B, E) ─► recurrent layer 1 … L ─► decoder ─► logits (T, B, V)

With `skip_connections` (the authors' MATLAB LSTM baseline), every layer also sees the input, and the decoder sees
every layer:

    layer 1 input = x          layer l input = [x ; y_{l-1}]          decoder input = [y_1 ; … ; y_L]

The recurrent state is a list with one (h, c) tuple per layer; the trainer carries it between consecutive segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlstm.cells import build_layer
from mlstm.data import load_corpus
from mlstm.errors import UserError

State = list  # one (h, c) tuple per layer


@dataclass
class ModelConfig:
    vocab_size: int  # number of distinct bytes in the corpus (205 for enwik8, 27 for text8)
    embedding_size: int = 0  # 0: one-hot input, as the MATLAB 1900-unit model; > 0: learned embedding (Chainer: 400)
    embed_dropout: float = 0.0  # dropout on embedding vectors (Chainer: 0.5); one mask per segment like the h dropout
    num_layers: int = 1  # stacked recurrent layers
    skip_connections: bool = False  # input to every layer, every layer to the decoder (MATLAB 2x1250 LSTM)

    @classmethod
    def from_cfg(cls, model_cfg, vocab_size: int) -> ModelConfig:
        cfg = cls(
            vocab_size=int(vocab_size),
            embedding_size=int(model_cfg.get("embedding_size", 0) or 0),
            embed_dropout=float(model_cfg.get("embed_dropout", 0.0) or 0.0),
            num_layers=int(model_cfg.get("num_layers", 1)),
            skip_connections=bool(model_cfg.get("skip_connections", False)),
        )
        if cfg.num_layers < 1:
            raise UserError(f"model.num_layers={cfg.num_layers} must be at least 1")
        if cfg.embedding_size < 0:
            raise UserError(f"model.embedding_size={cfg.embedding_size} must be 0 (one-hot) or a positive size")
        if not 0.0 <= cfg.embed_dropout < 1.0:
            raise UserError(f"model.embed_dropout={cfg.embed_dropout} must be in [0, 1)")
        return cfg


class CharLM(nn.Module):
    """Character-level language model around any recurrent layer built by `mlstm.cells.build_layer`."""

    def __init__(self, config: ModelConfig, cell_cfg):
        super().__init__()
        self.config = config
        V, E = config.vocab_size, config.embedding_size
        # Chainer init: embedding U(-0.2, 0.2). One-hot input needs no parameters: W x picks a column.
        self.embedding = nn.Embedding(V, E) if E > 0 else None
        if self.embedding is not None:
            nn.init.uniform_(self.embedding.weight, -0.2, 0.2)
        input_size = E if E > 0 else V
        layers = []
        for index in range(config.num_layers):
            if index == 0:
                layer_input = input_size
            elif config.skip_connections:
                layer_input = input_size + layers[-1].output_size
            else:
                layer_input = layers[-1].output_size
            layers.append(build_layer(cell_cfg, layer_input))
        self.layers = nn.ModuleList(layers)
        decoder_input = sum(l.output_size for l in layers) if config.skip_connections else layers[-1].output_size
        self.decoder = nn.Linear(decoder_input, V)

    def init_state(self, batch_size: int, device=None) -> State:
        return [layer.init_state(batch_size, device) for layer in self.layers]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, B) int64 -> (T, B, E) or (T, B, V) one-hot, with embedding dropout in training mode."""
        if self.embedding is None:
            return F.one_hot(tokens, self.config.vocab_size).to(self.decoder.weight.dtype)
        x = self.embedding(tokens)  # (T, B, E)
        p = self.config.embed_dropout
        if self.training and p > 0:
            # one mask per stream for the whole segment (variational), as the h dropout
            mask = torch.empty_like(x[0]).bernoulli_(1 - p) / (1 - p)  # (B, E)
            x = x * mask
        return x

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        x = self.embed(tokens)
        outputs, new_state = [], []
        layer_input = x
        for index, layer in enumerate(self.layers):
            if index > 0 and self.config.skip_connections:
                layer_input = torch.cat([x, outputs[-1]], dim=-1)
            y, layer_state = layer(layer_input, state[index])  # y (T, B, H_out)
            outputs.append(y)
            new_state.append(layer_state)
            layer_input = y
        decoder_input = torch.cat(outputs, dim=-1) if self.config.skip_connections else outputs[-1]
        return self.decoder(decoder_input), new_state  # (T, B, V)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def detach_state(state: State) -> State:
    """Truncated BPTT: keep the values carried to the next segment, drop the graph behind them."""
    return [tuple(t.detach() for t in layer_state) for layer_state in state]


def build_model(cfg, vocab_size: int) -> CharLM:
    """The model described by a composed train config (`cfg.model` and `cfg.cell`)."""
    return CharLM(ModelConfig.from_cfg(cfg.model, vocab_size), cfg.cell)


def vocab_size_of(cfg) -> int:
    known = cfg.dataset.get("vocab_size")
    if known:
        return int(known)
    return load_corpus(cfg.dataset, cfg.data_dir).vocab_size  # local file / HF dataset: read it (no training)


def count_parameters(cfg) -> int:
    """The parameters of the model a config describes, built on the meta device: shapes only, no data read for a
    dataset whose config names its `vocab_size`."""
    vocab_size = vocab_size_of(cfg)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size)
    return num_parameters(model)
