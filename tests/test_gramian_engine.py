"""The Gramian engine: G = J J^T without J, on every layer rule, the fallback and odd graphs."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradsurgery._linalg import gramian_from_blocks
from gradsurgery.engine import (
    GramianUnsupported,
    compute_gramian,
    gramian_pass,
    gramian_rules,
    jacobian_blocks,
)
from gradsurgery.engine._layers import matmul_gram, prefer_blocks
from gradsurgery.engine._plan import plan


def reference(losses: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """J (T x P) from the existing Jacobian engine, one backward per task."""
    blocks = jacobian_blocks(losses, params, strategy="loop", retain_graph=True)
    t = len(losses)
    return torch.cat(
        [
            (b if b is not None else torch.zeros(t, *p.shape, dtype=p.dtype)).reshape(t, -1)
            for b, p in zip(blocks, params)
        ],
        dim=1,
    )


def check(losses, params, rules=None, rtol=1e-5, chunk_size=None):
    """The engine's G and update J^T w against the Jacobian's, to ``rtol`` of their scale,
    with phase 2 both vmapped and as a loop over tasks."""
    jac = reference(losses, params)
    expected = gramian_from_blocks([jac])
    if rules is not None:
        assert gramian_rules(losses, params) == rules
    for batched in (True, False):
        result = gramian_pass(losses, params, chunk_size=chunk_size, batched=batched)
        _compare(result, jac, expected, losses, params, rtol)
    return result


def _compare(result, jac, expected, losses, params, rtol):
    got = result.gramian
    assert got.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-30)
    assert ((got - expected).abs().max() / scale).item() <= rtol, (got, expected)
    w = torch.linspace(-1.0, 2.0, len(losses), dtype=got.dtype)
    updates = {id(p): u for p, u in result.update(w)}
    flat = torch.cat(
        [updates[id(p)].reshape(-1) if id(p) in updates else p.new_zeros(p.numel()) for p in params]
    )
    for p in params:
        if id(p) in updates:
            assert updates[id(p)].shape == p.shape
    want = w.to(jac.dtype) @ jac
    err = (flat - want).abs().max() / want.abs().max().clamp_min(1e-30)
    assert err.item() <= 10 * rtol


def head_losses(z: torch.Tensor, t: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """T scalar losses of linear heads on the flattened features z (distinct scales)."""
    g = torch.Generator().manual_seed(seed)
    flat = z.reshape(z.shape[0], -1)
    losses = []
    for i in range(t):
        w = torch.randn(flat.shape[1], generator=g).to(flat.dtype)
        losses.append(((flat @ w - i) ** 2).mean() * (i + 1))
    return losses


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- every layer rule ----------------------------------------------------------------------


@pytest.mark.parametrize("batch", [3, 40])  # R < fan-in: keeps D (ghost); R > fan-in: blocks
def test_linear_both_contractions(batch):
    net = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8), nn.ReLU())
    z = net(torch.randn(batch, 16))
    result = check(head_losses(z), list(net.parameters()), ["linear"] * 4)
    kept = [layer.d is not None for layer in result._layers]
    assert kept == [batch == 3, batch == 3]


def test_each_layer_keeps_the_cheaper_of_blocks_and_output_gradients():
    """The MLP of benchmarks/step_speed.py: few tasks keep per-task weight blocks (the update
    is then w @ blocks), many tasks keep D where it is smaller (the ghost Gramian)."""
    shapes = [(256, 256, 512), (256, 512, 512), (256, 512, 256)]  # rows, fan-in, fan-out
    assert [prefer_blocks(2, *s) for s in shapes] == [True, True, True]
    assert [prefer_blocks(40, *s) for s in shapes] == [True, False, False]
    # never more than twice the smaller memory: 1 row, a 1000 x 1000 layer -> D
    assert not prefer_blocks(2, 1, 1000, 1000)
    assert prefer_blocks(2, 100_000, 3, 3)


def test_matmul_gram_routes_agree():
    g = torch.Generator().manual_seed(0)
    for rows, k in ((4, 30), (30, 4)):
        a = torch.randn(rows, k, generator=g, dtype=torch.float64)
        d = torch.randn(5, rows, 7, generator=g, dtype=torch.float64)
        per_task = torch.einsum("rk,trm->tkm", a, d).reshape(5, -1)
        torch.testing.assert_close(matmul_gram(a, d, torch.float64), per_task @ per_task.T)


def test_linear_on_3d_input_and_without_bias():
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.GELU(), nn.Linear(5, 4))
    z = net(torch.randn(2, 7, 6))  # (batch, sequence, features): rows = 14
    check(head_losses(z), list(net.parameters()), ["linear"] * 3)


def test_linear_output_read_directly_by_the_heads():
    """The consumer node is itself on the frontier (no activation after the last layer)."""
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    z = net(torch.randn(9, 6))
    check(head_losses(z), list(net.parameters()), ["linear"] * 4)


def test_plain_matrix_products():
    """x @ W (no transpose) and W @ x (the parameter as the first operand)."""
    right = nn.Parameter(torch.randn(6, 5))
    left = nn.Parameter(torch.randn(4, 9))
    x = torch.randn(9, 6)
    z = torch.tanh(left @ torch.tanh(x @ right))
    check(head_losses(z), [right, left], ["linear", "linear"])


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(3, 4, 3, padding=1),
        lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=1, groups=2, bias=False),
        lambda: nn.Conv2d(3, 4, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
        lambda: nn.Conv1d(3, 5, 3, dilation=2, padding=2),
        lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_convolutions(conv):
    layer = conv()
    channels = layer.in_channels
    x = (
        torch.randn(2, channels, 7)
        if isinstance(layer, nn.Conv1d)
        else torch.randn(2, channels, 7, 6)
    )
    z = torch.relu(layer(x))
    result = check(
        head_losses(z), list(layer.parameters()), ["conv"] * len(list(layer.parameters()))
    )
    assert result._layers[0].d is None  # many positions: per-task kernel gradients are smaller


@pytest.mark.parametrize("groups", [1, 2])
def test_convolution_with_few_rows_keeps_the_output_gradients(groups):
    layer = nn.Conv2d(32, 4, 2, groups=groups)  # 2 images x 1 position << 32 * 4 patch entries
    z = torch.tanh(layer(torch.randn(2, 32, 2, 2)))
    result = check(head_losses(z), list(layer.parameters()), ["conv", "conv"])
    assert result._layers[0].d is not None


@pytest.mark.parametrize("vocab", [11, 8])  # more rows than lookups (keeps D) or fewer (blocks)
@pytest.mark.parametrize("kwargs", [{}, {"padding_idx": 0}, {"scale_grad_by_freq": True}])
def test_embedding(kwargs, vocab):
    emb = nn.Embedding(vocab, 6, **kwargs)
    idx = torch.tensor([[1, 2, 0, 2, 7], [3, 1, 1, 0, 7]])
    z = torch.tanh(emb(idx))
    result = check(head_losses(z), [emb.weight], ["embedding"])
    assert (result._layers[0].d is None) == (vocab == 8)


def test_norm_layers():
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
    )
    z = net(torch.randn(3, 2, 6, 6))
    rules = ["conv"] * 2 + ["batch_norm"] * 2 + ["group_norm"] * 2 + ["linear"] * 2
    check(head_losses(z), list(net.parameters()), rules + ["layer_norm"] * 2)


def test_batch_norm_in_eval_mode_and_layer_norm_over_two_dims():
    bn = nn.BatchNorm1d(5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.eval()
    ln = nn.LayerNorm((3, 5))
    z = torch.tanh(ln(bn(torch.randn(4, 5)).unsqueeze(1).expand(4, 3, 5) * 1.0))
    params = list(bn.parameters()) + list(ln.parameters())
    check(head_losses(z), params, ["batch_norm"] * 2 + ["layer_norm"] * 2)


def test_mixed_model_float64_is_exact():
    emb = nn.Embedding(10, 8).double()
    body = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 8)).double()
    idx = torch.randint(0, 10, (5, 4))
    z = body(emb(idx)).tanh()
    params = [emb.weight, *body.parameters()]
    check(head_losses(z, t=4), params, rtol=1e-12)


# --- the fallback --------------------------------------------------------------------------


class Scale(nn.Module):
    """A module with no rule: an elementwise learnable scale."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return x * self.scale


def test_unsupported_module_bare_parameter_and_weight_sharing_fall_back():
    lin = nn.Linear(6, 6)
    scale = Scale(6)
    prelu = nn.PReLU(6)
    bare = nn.Parameter(torch.randn(6))
    x = torch.randn(5, 6)
    z = lin(prelu(lin(x))) + bare  # lin used twice: weight sharing
    z = scale(torch.tanh(z))
    params = [*lin.parameters(), scale.scale, prelu.weight, bare]
    check(head_losses(z, t=4), params, ["fallback"] * 5)


def test_transposed_and_3d_convolutions_fall_back():
    up = nn.ConvTranspose2d(2, 3, 2, stride=2)
    c3 = nn.Conv3d(3, 2, 1)
    z = torch.tanh(c3(up(torch.randn(2, 2, 3, 3)).unsqueeze(2)))
    params = [*up.parameters(), *c3.parameters()]
    check(head_losses(z), params, ["fallback"] * 4)


# --- graphs --------------------------------------------------------------------------------


def test_head_reading_two_levels_of_the_trunk():
    """A frontier node below another one: the engine grows the zone instead of double counting."""
    l1, l2 = nn.Linear(5, 6), nn.Linear(6, 6)
    h = torch.tanh(l1(torch.randn(7, 5)))
    z = torch.tanh(l2(h))
    heads = [nn.Linear(6, 1) for _ in range(3)]
    losses = [(heads[i](z) ** 2).mean() + (heads[i](h) ** 3).mean() * (i == 1) for i in range(3)]
    check(losses, [*l1.parameters(), *l2.parameters()], ["linear"] * 4)


def test_single_task_and_a_task_that_reaches_no_parameter():
    lin = nn.Linear(5, 4)
    z = torch.tanh(lin(torch.randn(6, 5)))
    check(head_losses(z, t=1), list(lin.parameters()))
    other = nn.Parameter(torch.randn(3))
    losses = [*head_losses(z, t=2), (other**2).sum()]
    result = check(losses, list(lin.parameters()), chunk_size=1)  # a chunk of only that task
    assert torch.all(result.gramian[2] == 0) and torch.all(result.gramian[:, 2] == 0)


def test_shared_parameter_used_inside_the_heads():
    lin = nn.Linear(5, 6)
    w = nn.Parameter(torch.randn(6, 6))
    z = torch.tanh(lin(torch.randn(4, 5)))
    losses = [((z @ w) ** 2).mean(), (z * w[0]).sum(), (z**2).mean()]
    check(losses, [*lin.parameters(), w], ["linear", "linear", "fallback"])


def test_losses_unbound_from_one_vector_and_chained_losses():
    lin = nn.Linear(5, 6)
    z = torch.tanh(lin(torch.randn(4, 5)))
    vector = torch.stack([(z**2).mean(), (z**3).mean(), z.mean()])
    check(list(vector.unbind()), list(lin.parameters()))
    first = (z**2).mean()
    check([first, 3 * first + z.sum()], list(lin.parameters()))


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunks_give_the_same_gramian(chunk_size):
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), Scale(8))
    z = net(torch.randn(6, 8))
    check(head_losses(z, t=5), list(net.parameters()), chunk_size=chunk_size)


def test_compute_gramian_frees_the_graph_when_asked():
    lin = nn.Linear(5, 4)
    losses = head_losses(torch.tanh(lin(torch.randn(6, 5))))
    expected = gramian_from_blocks([reference(losses, list(lin.parameters()))])
    got = compute_gramian(losses, list(lin.parameters()), retain_graph=False)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="second time"):
        compute_gramian(losses, list(lin.parameters()))


# --- precision -----------------------------------------------------------------------------


def test_half_precision_gives_a_float32_gramian():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    losses = [o.float().pow(2).mean() * (i + 1) for i, o in enumerate(net(x).unbind(1))]
    params = list(net.parameters())
    got = compute_gramian(losses, params)
    assert got.dtype == torch.float32
    expected = gramian_from_blocks([reference(losses, params)])
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-2  # bf16 rounding


def test_float32_overflow_is_recomputed_in_float64():
    lin = nn.Linear(5, 4)
    z = torch.tanh(lin(torch.randn(6, 5)))
    losses = [loss * 1e25 for loss in head_losses(z)]  # squared gradients ~1e50
    got = compute_gramian(losses, list(lin.parameters()))
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    jac = reference(losses, list(lin.parameters())).double()
    torch.testing.assert_close(got, jac @ jac.T, rtol=1e-5, atol=0)


# --- memory: never a T x P tensor ------------------------------------------------------------


class Allocations(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (forward, backward, contractions)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
        return out


def test_no_tensor_of_t_times_p_elements_and_no_per_task_weight_gradient():
    t = 6
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    params = list(net.parameters())
    n_params = sum(p.numel() for p in params)
    z = net(torch.randn(8, 64))  # 8 rows < 64 inputs: every layer takes the ghost contraction
    losses = head_losses(z, t=t)
    record = Allocations()
    with record:
        result = gramian_pass(losses, params)
        result.update(torch.ones(t))
    biggest = max(torch.Size(s).numel() for s in record.shapes)
    assert biggest < t * n_params / 10
    assert (t, 64, 64) not in record.shapes and (t, 64 * 64) not in record.shapes
    # the detector does see T x P where it exists: the Jacobian, concatenated
    record = Allocations()
    with record:
        jac = reference(losses, params)
    assert jac.shape == (t, n_params) and (t, n_params) in record.shapes


# --- errors --------------------------------------------------------------------------------


def test_bad_input_raises():
    lin = nn.Linear(3, 2)
    losses = head_losses(torch.tanh(lin(torch.randn(4, 3))), t=2)
    with pytest.raises(ValueError, match="chunk_size"):
        gramian_pass(losses, list(lin.parameters()), chunk_size=0)
    with pytest.raises(ValueError, match="at least one loss"):
        gramian_pass([], list(lin.parameters()))
    leaf = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(GramianUnsupported, match="leaf"):
        gramian_pass([leaf, losses[0]], list(lin.parameters()))
    with pytest.raises(GramianUnsupported, match="not found"):
        gramian_pass(losses, [nn.Parameter(torch.ones(2))])
    result = gramian_pass(losses, list(lin.parameters()), keep=False)
    with pytest.raises(ValueError, match="shape"):
        gramian_pass(losses, list(lin.parameters())).update(torch.ones(3))
    with pytest.raises(RuntimeError, match="released"):
        result.update(torch.ones(2))


def test_phase_two_is_vmapped_by_default_except_where_a_loop_is_faster():
    gramian_module = importlib.import_module("gradsurgery.engine.gramian")
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten())
    threads = torch.get_num_threads()
    try:
        decisions = []
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for net, x in ((mlp, torch.randn(3, 4)), (cnn, torch.randn(3, 1, 5, 5))):
                losses = head_losses(net(x), t=2)
                the_plan = plan(losses, list(net.parameters()))
                decisions.append(gramian_module._batched_by_default(the_plan, x.device))
    finally:
        torch.set_num_threads(threads)
    assert decisions == [False, False, True, False]  # (1 thread: mlp, cnn), (2: mlp, cnn)
