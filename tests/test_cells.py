"""The recurrent layers against independent NumPy references, autograd, the layer interface and the config checks."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.func import functional_call

from mlstm.cells import build_layer
from mlstm.errors import UserError

try:  # tests/ is a rootdir on sys.path (no __init__.py) ...
    from numpy_reference import REFERENCES
except ImportError:  # ... or a package
    from tests.numpy_reference import REFERENCES

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

KINDS = {
    "paper": dict(name="mlstm", form="paper"),
    "matlab": dict(name="mlstm", form="matlab"),
    "seed": dict(name="mlstm", form="seed"),
    "seed_gated": dict(name="mlstm", form="seed", seed_output="gated"),
    "loop": dict(name="lstm", impl="loop"),
    "cudnn": dict(name="lstm", impl="cudnn"),
}
LOOP_KINDS = ["paper", "matlab", "seed", "seed_gated", "loop"]
VARIANTS = {
    "plain": {},
    "peep_clip": dict(use_peepholes=True, cell_clip=0.4, forget_bias=0.7),
    "proj": dict(num_proj=3, proj_clip=0.2, activation="identity"),
    "all": dict(use_peepholes=True, cell_clip=0.4, num_proj=3, proj_clip=0.2, forget_bias=-0.5, activation="relu"),
}
CASES = [(k, v) for k in LOOP_KINDS for v in VARIANTS] + [("cudnn", "plain"), ("cudnn", "proj_only")]
I, H, B, T = 4, 5, 3, 7


def make(kind, variant="plain", hidden=H, inputs=I, **extra):
    opts = dict(num_proj=3) if variant == "proj_only" else VARIANTS[variant]
    return build_layer({**KINDS[kind], "hidden_size": hidden, **opts, **extra}, inputs)


def random_paper_weights(layer, scale=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return {k: torch.from_numpy(rng.normal(0, scale, tuple(v.shape))) for k, v in layer.to_paper_weights().items()}


def random_state(layer, batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, layer.output_size, generator=g, dtype=torch.float64) * 0.5
    c = torch.randn(batch, layer.hidden_size, generator=g, dtype=torch.float64)
    return h, c


@pytest.mark.parametrize("kind,variant", CASES)
def test_matches_numpy_reference(kind, variant):
    layer = make(kind, variant).double().eval()
    weights = random_paper_weights(layer)
    layer.load_paper_weights(weights)
    for k, v in layer.to_paper_weights().items():  # the mapping round-trips exactly
        assert torch.equal(v, weights[k]), k
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h0, c0 = random_state(layer)
    cfg = layer.cfg
    ys, cs, (h_ref, c_ref) = REFERENCES[kind](
        {k: v.numpy() for k, v in weights.items()},
        x.numpy(),
        h0.numpy(),
        c0.numpy(),
        forget_bias=cfg.forget_bias,
        cell_clip=cfg.cell_clip,
        proj_clip=cfg.proj_clip,
        activation=cfg.activation,
    )
    with torch.no_grad():
        y, (h, c) = layer(x, (h0, c0))
    assert y.shape == (T, B, layer.output_size) and h.dtype == c.dtype == torch.float64
    for t in range(T):  # step by step
        np.testing.assert_allclose(y[t].numpy(), ys[t], rtol=0, atol=1e-10, err_msg=f"step {t}")
    np.testing.assert_allclose(h.numpy(), h_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=0, atol=1e-10)
    if cfg.cell_clip is not None:
        assert (np.abs(cs) == cfg.cell_clip).any(), "the cell clip never clipped"
    if cfg.proj_clip is not None:
        assert (np.abs(ys) == cfg.proj_clip).any(), "the projection clip never clipped"


GRAD_CASES = [(k, v) for k in LOOP_KINDS for v in ("plain", "all")] + [("cudnn", "proj_only"), ("paper", "wn")]


@pytest.mark.parametrize("kind,variant", GRAD_CASES)
def test_gradcheck(kind, variant):
    """Gradients w.r.t. the input, the carried state and every parameter (weight-norm gains included)."""
    extra = dict(weight_norm=True) if variant == "wn" else {}
    variant = "peep_clip" if variant == "wn" else variant
    if variant == "all":  # relu is not differentiable at 0; tanh keeps the check meaningful
        extra["activation"] = "tanh"
    layer = make(kind, variant, hidden=4, inputs=2, **extra).double().train()
    layer.load_paper_weights(random_paper_weights(layer))
    names, params = zip(*layer.named_parameters())
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0, c0 = (s.requires_grad_() for s in random_state(layer, batch=2))

    def run(x, h0, c0, *p):
        y, (h, c) = functional_call(layer, dict(zip(names, p)), (x, (h0, c0)))
        return y, h, c

    inputs = (x, h0, c0) + tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,variant", [(k, "all") for k in LOOP_KINDS] + [("cudnn", "proj_only")])
def test_carried_state_equals_one_long_segment(kind, variant):
    layer = make(kind, variant).double().eval()
    layer.load_paper_weights(random_paper_weights(layer))
    x = torch.randn(8, B, I, dtype=torch.float64)
    state = random_state(layer)
    with torch.no_grad():
        y_full, (h_full, c_full) = layer(x, state)
        y1, s1 = layer(x[:3], state)
        y2, (h2, c2) = layer(x[3:], s1)
    torch.testing.assert_close(torch.cat([y1, y2]), y_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(h2, h_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(c2, c_full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", list(KINDS))
def test_variational_dropout(kind):
    torch.manual_seed(0)
    layer = make(kind, hidden=6, dropout=0.5).double()
    plain = make(kind, hidden=6).double()
    plain.load_paper_weights(layer.to_paper_weights())
    x = torch.randn(5, 4, I, dtype=torch.float64)
    state = random_state(layer, batch=4)
    layer.train()
    with torch.no_grad():
        y, (h, c) = layer(x, state)
        y_again, _ = layer(x, state)
        y_eval, (h_eval, _) = plain(x, state)
    dropped = y == 0  # (T, B, P)
    assert dropped[0].any() and not dropped[0].all()
    assert (dropped == dropped[0]).all(), "the mask must be constant across time within one forward call"
    assert not torch.equal(dropped, y_again == 0), "two calls must draw two masks"
    torch.testing.assert_close(y[0], y_eval[0] * (~dropped[0]) * 2.0)  # step 0: same input, kept units scaled 1/(1-p)
    if kind == "cudnn":  # output-only dropout: the recurrence and the state are not masked
        torch.testing.assert_close(y, y_eval * (~dropped[0]) * 2.0)
        torch.testing.assert_close(h, h_eval)
    else:  # the masked h is carried
        assert torch.equal(h, y[-1])
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, state)[0], y_eval, rtol=0, atol=0)


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_weight_norm_same_function_and_gains_are_parameters(kind):
    normed = make(kind, "peep_clip", weight_norm=True).double()
    plain = make(kind, "peep_clip").double()
    weights = random_paper_weights(normed)
    normed.load_paper_weights(weights)
    for k, v in normed.to_paper_weights().items():  # effective weights are what was loaded
        torch.testing.assert_close(v, weights[k], rtol=0, atol=1e-12)
    plain.load_paper_weights(normed.to_paper_weights())
    x = torch.randn(T, B, I, dtype=torch.float64)
    state = random_state(plain)
    y, _ = normed(x, state)
    torch.testing.assert_close(y, plain(x, state)[0], rtol=0, atol=1e-12)
    y.sum().backward()
    gains = {n: p for n, p in normed.named_parameters() if n.endswith("parametrizations.weight.original0")}
    assert sorted(n.split(".")[0] for n in gains) == sorted(type(normed).NORMED)
    for n, g in gains.items():
        w = normed.get_submodule(n.split(".")[0]).weight
        assert g.shape == (w.shape[0], 1) and g.grad is not None and g.grad.abs().sum() > 0
        torch.testing.assert_close(g, w.norm(dim=1, keepdim=True))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(normed) == count(plain) + sum(g.numel() for g in gains.values())


def assert_semi_orthogonal(w, scale=1.0):
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T  # orthonormal columns, else rows
    torch.testing.assert_close(gram, scale**2 * torch.eye(gram.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_orthogonal_init_and_forget_bias_rows(kind):
    layer = make(kind, "proj_only", hidden=8, inputs=5, init_scale=2.0)
    weights = layer.to_paper_weights()
    for _name, w in weights.items():
        if w.dim() == 2:  # each matrix as a whole; the seed's A and W over their concatenated columns
            assert_semi_orthogonal(w, 2.0)
    H = 8
    forget = {
        "paper": ("b", 2),
        "matlab": ("b", 1),
        "seed": ("w", 2),
        "seed_gated": ("w", 2),
        "loop": ("b", 1),
        "cudnn": ("b", 1),
    }[kind]
    bias = weights[forget[0]]
    expected = torch.zeros_like(bias)
    expected[forget[1] * H : (forget[1] + 1) * H] = 0.0 if kind.startswith("seed") else 3.0
    assert torch.equal(bias, expected)
    if kind == "cudnn":
        assert torch.equal(layer.lstm.bias_ih_l0, expected) and not layer.lstm.bias_hh_l0.any()
    custom = make(kind, hidden=8, forget_bias_init=1.5).to_paper_weights()[forget[0]]
    assert (custom[forget[1] * H : (forget[1] + 1) * H] == 1.5).all()


@pytest.mark.parametrize("kind", ["paper", "seed", "loop"])
def test_matlab_init_stds(kind):
    torch.manual_seed(0)
    layer = make(kind, hidden=128, inputs=64, init="matlab", use_peepholes=True)
    w = layer.to_paper_weights()
    if kind == "seed":
        parts = {"x": [w["A"][:, :64], w["W"][:, :64]], "rec": [w["A"][:, 64:], w["W"][:, 64:]]}
    elif kind == "paper":
        parts = {"x": [w["W_mx"], w["W_x"]], "rec": [w["W_mh"], w["W_m"]]}
    else:
        parts = {"x": [w["W_x"]], "rec": [w["W_h"]]}
    for std, key in ((0.1, "x"), (0.02, "rec")):
        for m in parts[key]:
            assert abs(m.std().item() - std) < 0.05 * std and abs(m.mean().item()) < 0.1 * std
    assert not w["w_I"].any() and not w["w_O"].any()


@pytest.mark.parametrize("kind", ["paper", "loop", "cudnn"])
def test_torch_init_is_uniform_within_bound(kind):
    layer = make(kind, hidden=16, init="torch")
    weights = {n: p.detach().clone() for n, p in layer.named_parameters()}
    f = slice(2 * 16, 3 * 16) if kind == "paper" else slice(16, 32)
    bias = "lstm.bias_ih_l0" if kind == "cudnn" else "b"
    assert (weights[bias][f] == 3.0).all()
    weights[bias][f] = 0.0
    if kind == "cudnn":
        assert not weights["lstm.bias_hh_l0"][f].any()
        weights["lstm.bias_hh_l0"][f] = 0.1
    for v in weights.values():  # U(-1/√H, 1/√H) everywhere else (nn.LSTM's default)
        assert 0.2 < v.abs().max() <= 0.25 + 1e-7


def test_parameter_count_of_the_paper_model():
    layer = build_layer({"name": "mlstm", "form": "paper", "hidden_size": 1900, "init": "torch"}, 205)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "W_mx.weight": (1900, 205),
        "W_mh.weight": (1900, 1900),
        "W_x.weight": (7600, 205),
        "W_m.weight": (7600, 1900),
        "b": (7600,),
    }
    assert sum(p.numel() for p in layer.parameters()) == 389_500 + 3_610_000 + 1_558_000 + 14_440_000 + 7_600


@pytest.mark.parametrize("kind", list(KINDS))
def test_interface(kind):
    layer = make(kind, "proj_only")
    assert (layer.input_size, layer.hidden_size, layer.output_size) == (I, H, 3)
    h, c = layer.init_state(B)
    assert h.shape == (B, 3) and c.shape == (B, H) and h.dtype == c.dtype == torch.float32
    assert not h.any() and not c.any()
    x = torch.randn(T, B, I, requires_grad=True)
    y, (h1, c1) = layer(x, (h, c))
    assert y.shape == (T, B, 3) and h1.shape == (B, 3) and c1.shape == (B, H)
    assert h1.requires_grad  # the layer does not detach: the trainer does
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("kind,variant", [(k, "peep_clip") for k in LOOP_KINDS] + [("cudnn", "proj_only")])
def test_bf16_autocast_keeps_float32_state(kind, variant):
    layer = make(kind, variant, hidden=16, inputs=8, dropout=0.1)
    x = torch.randn(6, B, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = layer(x, layer.init_state(B))
        loss = y.float().square().mean()
    loss.backward()
    assert torch.isfinite(y).all() and h.dtype == c.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    y2, (h2, c2) = layer(x.bfloat16(), (h.detach(), c.detach()))  # bf16 input without autocast
    assert y2.dtype == h2.dtype == c2.dtype == torch.float32


def test_dictconfig_and_null_defaults():
    cfg = OmegaConf.create(
        dict(
            name="mlstm",
            form="seed",
            impl=None,
            hidden_size=4,
            forget_bias=None,
            forget_bias_init=None,
            cell_clip=None,
            num_proj=None,
        )
    )
    layer = build_layer(cfg, 3)
    assert type(layer).__name__ == "FastSeedMultiplicativeLSTM"  # impl defaults to the fast layer
    assert (layer.cfg.impl, layer.cfg.forget_bias, layer.cfg.forget_bias_init) == ("fast", 1.0, 0.0)
    lstm = build_layer(OmegaConf.create(dict(name="lstm", hidden_size=4, form=None, impl=None)), 3)
    assert type(lstm).__name__ == "LSTMCudnn" and lstm.cfg.forget_bias_init == 3.0


BAD = [
    (dict(name="gru"), "cell.name"),
    (dict(hidden_size=0), "cell.hidden_size"),
    (dict(hidden_size=2.5), "cell.hidden_size"),
    (dict(hidden_size=None), "cell.hidden_size"),
    (dict(dropout=1.0), "cell.dropout"),
    (dict(dropout=-0.1), "cell.dropout"),
    (dict(form="transformer"), "cell.form"),
    (dict(impl="cudnn"), "cell.impl"),
    (dict(init="xavier"), "cell.init"),
    (dict(activation="sigmoid"), "cell.activation"),
    (dict(num_proj=0), "cell.num_proj"),
    (dict(num_proj=-2), "cell.num_proj"),
    (dict(cell_clip=0), "cell.cell_clip"),
    (dict(proj_clip=1.0), "cell.proj_clip"),
    (dict(use_peepholes="yes"), "cell.use_peepholes"),
    (dict(hidden_szie=4), "hidden_szie"),
    (dict(name="lstm", form="paper"), "cell.form"),
    (dict(name="lstm", impl="reference"), "cell.impl"),
    (dict(name="lstm", use_peepholes=True), "cell.impl=loop"),
    (dict(name="lstm", cell_clip=1.0), "cell.impl=loop"),
    (dict(name="lstm", num_proj=3, proj_clip=1.0), "cell.impl=loop"),
    (dict(name="lstm", weight_norm=True), "cell.impl=loop"),
    (dict(name="lstm", activation="relu"), "cell.impl=loop"),
    (dict(name="lstm", forget_bias=1.0), "cell.impl=loop"),
    (dict(form="paper", seed_output="gated"), "cell.seed_output applies to cell.form=seed"),
    (dict(form="seed", seed_output="sigmoid"), "cell.seed_output must be one of posted, gated"),
]


@pytest.mark.parametrize("overrides,needle", BAD)
def test_bad_config_raises_one_line_user_error(overrides, needle):
    with pytest.raises(UserError) as e:
        build_layer({"name": "mlstm", "hidden_size": 4, **overrides}, 3)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_load_paper_weights_checks_names_and_shapes():
    layer = make("paper")
    weights = layer.to_paper_weights()
    weights["W_m"] = torch.zeros(3, 3)
    weights["extra"] = weights.pop("b")
    with pytest.raises(UserError) as e:
        layer.load_paper_weights(weights)
    msg = str(e.value)
    assert "missing b" in msg and "unexpected extra" in msg and "W_m" in msg and "\n" not in msg
