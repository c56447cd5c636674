"""What every recurrent layer shares: the validated cell config and the time loop.

`CellConfig` is the one place the `cell:` config group is checked and its nulls resolved to each form's defaults
(see `build_layer` in `mlstm.cells`). `RecurrentLayer` is the common body of the Python-loop layers (the three mLSTM
forms and the LSTM "loop" impl), so that an LSTM and an mLSTM run through the very same code path:

    x (T, B, I) ──one matmul──► input projections of the whole segment (T, B, K)   [hoisted out of the loop]
    for t in 0..T-1:  (h, c) = step(projection_t, h, c)       # the form's equations, float32 pointwise math
                      h = h ⊙ mask                            # variational dropout: one mask per forward call
    y = stack(h_t)  (T, B, P),  final state (h, c)

Options shared by all forms: standard (Gers) peepholes — i and f see c_{t-1}, o sees c_t — cell_clip (c clipped to
±cell_clip before the output; the clipped c is carried, as in TensorFlow), num_proj (h = W_P h, W_P of shape (P, H))
then proj_clip (±proj_clip). The projected, clipped, dropped-out h is both the output and the recurrent input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from mlstm.cells.init import initialize
from mlstm.cells.weights import get_tensor, set_tensor
from mlstm.errors import UserError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "identity": lambda v: v,
}
NAMES = ("mlstm", "lstm")
FORMS = ("paper", "matlab", "seed")
IMPLS = {"mlstm": ("fast", "reference"), "lstm": ("cudnn", "loop")}  # the first is the default
INITS = ("orthogonal", "matlab", "torch")
SEED_OUTPUTS = ("posted", "gated")  # seed form: h = act(c ⊙ o) as posted, or the LSTM's h = σ(o) ⊙ act(c)


@dataclass(frozen=True)
class CellConfig:
    """One recurrent layer, with every null already resolved (build it with `CellConfig.resolve`)."""

    hidden_size: int  # H: units of the cell state c
    name: str = "mlstm"  # "mlstm" | "lstm"
    form: str | None = None  # mlstm equations: "paper" | "matlab" | "seed" (PAPER.md §1); None for lstm
    # mlstm: "fast" (default) | "reference"; lstm: "cudnn" (nn.LSTM) | "loop" (this module's loop)
    impl: str | None = None
    use_peepholes: bool = False  # diagonal peepholes (seed semantics for the seed form, Gers' otherwise)
    cell_clip: float | None = None  # clip c to ±cell_clip before the output (the clipped c is carried)
    num_proj: int | None = None  # P: project h = W_P h (H -> P); None: no projection, P = H
    proj_clip: float | None = None  # clip the projected h to ±proj_clip (needs num_proj)
    forget_bias: float | None = None  # constant added to the forget pre-activation every step (seed 1.0, else 0.0)
    forget_bias_init: float | None = None  # initial forget-gate bias parameter (seed 0.0, else 3.0)
    init: str = "orthogonal"  # "orthogonal" | "matlab" (N(0, .1) input, N(0, .02) recurrent) | "torch" (U(±1/√H))
    init_scale: float = 1.0  # multiplies every random weight matrix of the init
    activation: str = "tanh"  # replaces tanh on the cell/output: "tanh" | "relu" | "identity"
    weight_norm: bool = False  # weight normalisation (one gain per output row) of the four main matrices
    dropout: float = 0.0  # variational dropout on h: one Bernoulli mask per forward call (= per TBPTT segment)
    seed_output: str | None = None  # seed form only: "posted" (default, h = act(c ⊙ o)) | "gated" (σ(o) ⊙ act(c))

    @property
    def output_size(self) -> int:
        return self.num_proj or self.hidden_size

    @classmethod
    def resolve(cls, cell_cfg: Any) -> CellConfig:
        """Validate a DictConfig or dict of the `cell:` group and fill the form's defaults; UserError if invalid."""
        if cell_cfg is None:
            raise UserError("cell config is missing; give at least cell.name and cell.hidden_size")
        if not isinstance(cell_cfg, dict):
            from omegaconf import DictConfig, OmegaConf

            if not isinstance(cell_cfg, DictConfig):
                raise UserError(f"cell config must be a mapping, got {type(cell_cfg).__name__}")
            cell_cfg = OmegaConf.to_container(cell_cfg, resolve=True)
        raw = dict(cell_cfg)
        keys = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(keys))
        if unknown:
            raise UserError(f"unknown cell config key(s) {', '.join(unknown)}; allowed keys: {', '.join(keys)}")
        if raw.get("hidden_size") is None:
            raise UserError("cell.hidden_size is required (an integer > 0)")
        raw = {k: v for k, v in raw.items() if v is not None or k in ("form", "impl")}
        name = _choice(raw.get("name", "mlstm"), "name", NAMES)
        if name == "mlstm":
            form = _choice(raw.get("form") or "paper", "form", FORMS)
        else:
            if raw.get("form") is not None:
                raise UserError(f"cell.form applies to cell.name=mlstm only; leave it null, got {raw['form']!r}")
            form = None
        impl = _choice(raw.get("impl") or IMPLS[name][0], "impl", IMPLS[name], f" for cell.name={name}")
        seed = form == "seed"
        cfg = cls(
            hidden_size=_number(raw["hidden_size"], "hidden_size", integer=True, low=0),
            name=name,
            form=form,
            impl=impl,
            use_peepholes=_flag(raw.get("use_peepholes", False), "use_peepholes"),
            cell_clip=_number(raw.get("cell_clip"), "cell_clip", low=0),
            num_proj=_number(raw.get("num_proj"), "num_proj", integer=True, low=0),
            proj_clip=_number(raw.get("proj_clip"), "proj_clip", low=0),
            forget_bias=_number(raw.get("forget_bias", 1.0 if seed else 0.0), "forget_bias"),
            forget_bias_init=_number(raw.get("forget_bias_init", 0.0 if seed else 3.0), "forget_bias_init"),
            init=_choice(raw.get("init", "orthogonal"), "init", INITS),
            init_scale=_number(raw.get("init_scale", 1.0), "init_scale", low=0),
            activation=_choice(raw.get("activation", "tanh"), "activation", tuple(ACTIVATIONS)),
            weight_norm=_flag(raw.get("weight_norm", False), "weight_norm"),
            dropout=_number(raw.get("dropout", 0.0), "dropout", low=0.0, high=1.0, low_inclusive=True),
            seed_output=_choice(raw.get("seed_output", "posted"), "seed_output", SEED_OUTPUTS) if seed else None,
        )
        if not seed and raw.get("seed_output") is not None:
            raise UserError(
                f"cell.seed_output applies to cell.form=seed only; leave it null, got {raw['seed_output']!r}"
            )
        if cfg.proj_clip is not None and cfg.num_proj is None:
            raise UserError("cell.proj_clip needs cell.num_proj (the clip applies to the projected output)")
        return cfg


def _choice(value: Any, key: str, allowed: tuple[str, ...], where: str = "") -> str:
    if value not in allowed:
        raise UserError(f"cell.{key} must be one of {', '.join(allowed)}{where}, got {value!r}")
    return value


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"cell.{key} must be true or false, got {value!r}")
    return value


def _number(value, key, *, integer=False, low=None, high=None, low_inclusive=False):
    """None stays None; otherwise a number in (low, high) (low included if low_inclusive), else UserError."""
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and not isinstance(value, bool)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value < high
    if not ok:
        rng = "" if low is None else f" {'>=' if low_inclusive else '>'} {low}"
        rng += "" if high is None else f" and < {high}"
        raise UserError(f"cell.{key} must be {kind}{rng}, got {value!r}")
    return int(value) if integer else float(value)


def check_paper_weights(expected: dict[str, tuple[int, ...]], given: dict) -> dict[str, torch.Tensor]:
    """Names and shapes of `given` must equal `expected`; returns the tensors, else one UserError listing all faults."""
    faults = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing:
        faults.append(f"missing {', '.join(missing)}")
    if unexpected:
        faults.append(f"unexpected {', '.join(map(str, unexpected))}")
    tensors = {k: torch.as_tensor(given[k]) for k in expected if k in given}
    wrong = [f"{k} {tuple(t.shape)} (expected {expected[k]})" for k, t in tensors.items() if t.shape != expected[k]]
    if wrong:
        faults.append(f"shape mismatch {', '.join(wrong)}")
    if faults:
        raise UserError(f"load_paper_weights: {'; '.join(faults)}")
    return tensors


class RecurrentLayer(nn.Module):
    """Base of the Python-loop layers. A subclass declares its parameters and implements `_project_inputs` and `_step`.

    Subclass declarations (used by `to_paper_weights`, `load_paper_weights` and `mlstm.cells.init`):
      PAPER_LAYOUT   {paper name: (attribute names, dim)}: the paper tensor is the concat of the attributes over dim
      weight_groups  tuples of weight attributes initialised as ONE matrix concatenated over columns (the seed's A, W)
      input_weights  weight attributes that multiply x (N(0, 0.1) under init=matlab; the others get N(0, 0.02))
      bias_names     bias and peephole attributes (zero, or U(±1/√H) under init=torch)
      forget_slots() [(attribute, rows, value)]: the forget-gate bias rows and their initial value
    """

    PAPER_LAYOUT: dict[str, tuple[tuple[str, ...], int]] = {}
    NORMED: tuple[str, ...] = ()  # Linear-style weights that get weight normalisation when cfg.weight_norm

    def __init__(self, input_size: int, cfg: CellConfig):
        super().__init__()
        self.cfg = cfg
        self.input_size = input_size
        self.hidden_size = cfg.hidden_size
        self.output_size = cfg.output_size
        self.act = ACTIVATIONS[cfg.activation]
        self.weight_groups: list[tuple[str, ...]] = []
        self.input_weights: set[str] = set()
        self.bias_names: list[str] = []

    # ---- construction helpers for subclasses ----
    def _linear(self, name: str, in_features: int, out_features: int, x_side: bool = False) -> None:
        """A bias-free nn.Linear holding W (out, in) as `name.weight` (weight-normalised later if listed in NORMED);
        x_side: it multiplies the input x."""
        setattr(self, name, nn.Linear(in_features, out_features, bias=False))
        if x_side:
            self.input_weights.add(name)

    def _vector(self, name: str, size: int) -> None:
        self.register_parameter(name, nn.Parameter(torch.zeros(size)))
        self.bias_names.append(name)

    def _finish(self) -> None:
        """Peepholes and projection common to all forms, weight norm, then the init (mlstm.cells.init)."""
        H = self.hidden_size
        if self.cfg.use_peepholes:
            for name in ("w_I", "w_F", "w_O"):  # diagonal peephole vectors (H,)
                self._vector(name, H)
        if self.cfg.num_proj:
            self._linear("W_P", H, self.cfg.num_proj)  # (P, H); TF's W_P is its transpose (H, P)
            self.weight_groups.append(("W_P",))
        if self.cfg.weight_norm:
            for name in self.NORMED:  # w = g v / |v| per output row: g (out, 1), v (out, in)
                weight_norm(getattr(self, name), name="weight", dim=0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        initialize(self)

    def forget_slots(self) -> list[tuple[str, slice, float]]:
        raise NotImplementedError

    # ---- the layer interface ----
    @property
    def state_dtype(self) -> torch.dtype:
        """float32 (also under bf16 autocast), float64 when the layer itself is float64 (tests)."""
        return torch.promote_types(next(self.parameters()).dtype, torch.float32)

    def init_state(self, batch_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        device = device if device is not None else next(self.parameters()).device
        h = torch.zeros(batch_size, self.output_size, device=device, dtype=self.state_dtype)  # (B, P)
        c = torch.zeros(batch_size, self.hidden_size, device=device, dtype=self.state_dtype)  # (B, H)
        return h, c

    def _begin_segment(self, x: torch.Tensor, state):
        """What every implementation needs before the time loop: (h, c, weights, input projections, dropout mask)."""
        h, c, w, x, mask = self._begin(x, state)
        xp = self._project_inputs(x, w)  # (T, B, K): every input projection of the segment in one product
        return h, c, w, xp, mask

    def _begin(self, x: torch.Tensor, state):
        """`_begin_segment` before the input projection: (h, c, weights, x in the weights' dtype, dropout mask)."""
        T, B, _ = x.shape  # (T, B, I), time-major
        if state is None:
            state = self.init_state(B, x.device)
        sd = self.state_dtype
        h, c = state[0].to(sd), state[1].to(sd)  # (B, P), (B, H)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(next(self.parameters()).dtype)
        w = {name: get_tensor(self, name) for name in self.parameter_tensors()}  # g v/|v| computed once per segment
        mask = self.dropout_mask(B, x.device, sd)  # (B, P) or None
        return h, c, w, x, mask

    def forward(self, x: torch.Tensor, state=None):
        h, c, w, xp, mask = self._begin_segment(x, state)
        ys = []
        for t in range(x.shape[0]):  # T steps
            h, c = self._step(xp[t], h, c, w)
            if mask is not None:
                h = h * mask  # the masked h feeds both the recurrence and the output
            ys.append(h)
        return torch.stack(ys), (h, c)  # (T, B, P), ((B, P), (B, H))

    def parameter_tensors(self) -> list[str]:
        return [n for names, _ in self.PAPER_LAYOUT.values() for n in names] + self._option_names()

    def _option_names(self) -> list[str]:
        return (["w_I", "w_F", "w_O"] if self.cfg.use_peepholes else []) + (["W_P"] if self.cfg.num_proj else [])

    def dropout_mask(self, batch_size: int, device, dtype) -> torch.Tensor | None:
        """Variational dropout (Gal & Ghahramani): one mask per forward call, scaled by 1/(1-p); training mode only."""
        p = self.cfg.dropout
        if not self.training or p == 0.0:
            return None
        keep = torch.full((batch_size, self.output_size), 1.0 - p, device=device, dtype=dtype)
        return torch.bernoulli(keep) / (1.0 - p)  # (B, P)

    # ---- pieces of the step shared by the forms ----
    def _lin(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """W v in the state dtype (under autocast the product runs in bf16, the result comes back to float32)."""
        return F.linear(v, weight).to(v.dtype)

    def _hoisted(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """W x + b for a whole segment (T, B, K), in the state dtype. Without autocast the bias rides in the product
        (one addmm: a separate add would be another pass over the largest activation of the step); under autocast
        the product runs in the low dtype and the bias is added after the cast to float32."""
        if torch.is_autocast_enabled(x.device.type) and self.state_dtype != torch.float64:
            return F.linear(x, weight).to(self.state_dtype) + bias
        return F.linear(x, weight, bias)

    def _gated_cell(self, zi, zf, cand, c_prev, w):
        """c_t = σ(z_f + forget_bias [+ w_F⊙c_{t-1}]) ⊙ c_{t-1} + σ(z_i [+ w_I⊙c_{t-1}]) ⊙ cand, then cell_clip."""
        if self.cfg.use_peepholes:  # Gers' peepholes: the input and forget gates see c_{t-1}
            zi = zi + w["w_I"] * c_prev
            zf = zf + w["w_F"] * c_prev
        if self.cfg.forget_bias:
            zf = zf + self.cfg.forget_bias
        return self._clip_cell(torch.sigmoid(zf) * c_prev + torch.sigmoid(zi) * cand)

    def _output_gate(self, zo, c, w):
        """o_t = σ(z_o [+ w_O⊙c_t]), c_t after cell_clip."""
        return torch.sigmoid(zo + w["w_O"] * c if self.cfg.use_peepholes else zo)

    def _clip_cell(self, c):
        clip = self.cfg.cell_clip
        return c if clip is None else c.clamp(-clip, clip)

    def _project(self, h, w):
        """h = W_P h (B, H) -> (B, P), then ±proj_clip; identity without num_proj."""
        if not self.cfg.num_proj:
            return h
        h = self._lin(h, w["W_P"])
        clip = self.cfg.proj_clip
        return h if clip is None else h.clamp(-clip, clip)

    # ---- paper weights ----
    def to_paper_weights(self) -> dict[str, torch.Tensor]:
        """Effective weights named as in PAPER.md, (out, in) convention; detached copies."""
        layout = dict(self.PAPER_LAYOUT, **{n: ((n,), 0) for n in self._option_names()})
        return {
            paper: torch.cat([get_tensor(self, n).detach() for n in names], dim=dim).clone()
            for paper, (names, dim) in layout.items()
        }

    def load_paper_weights(self, weights: dict) -> None:
        """Set the layer from `to_paper_weights`-style tensors (checked names and shapes); weight norm: g, v set so
        that g v/|v| equals the given weight."""
        layout = dict(self.PAPER_LAYOUT, **{n: ((n,), 0) for n in self._option_names()})
        expected = {k: tuple(v.shape) for k, v in self.to_paper_weights().items()}
        tensors = check_paper_weights(expected, weights)
        for paper, (names, dim) in layout.items():
            sizes = [get_tensor(self, n).shape[dim] for n in names]
            for name, part in zip(names, tensors[paper].split(sizes, dim=dim)):
                set_tensor(self, name, part)

    def extra_repr(self) -> str:
        c = self.cfg
        sizes = f"input_size={self.input_size}, hidden_size={self.hidden_size}, output_size={self.output_size}"
        return f"{c.name}/{c.form or c.impl}, {sizes}"
