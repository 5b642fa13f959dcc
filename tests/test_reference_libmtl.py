"""Cross-checks against LibMTL 1.1.5 (the registry's latest release of LibMTL).

For each method both libraries implement (PCGrad, MGDA, CAGrad, GradVac, IMTL-G, GradDrop) we
run LibMTL's weighting on the same Jacobians as ours and compare the updates, or test the
documented relation where the conventions differ. Where LibMTL 1.1.5 has a bug, a test shows
it (and where the two still agree, another test compares them there).

Install (LibMTL's own pins, e.g. torch==1.8, cannot be installed next to a current torch, and
its weightings only need torch, numpy and scipy)::

    pip install --no-deps LibMTL==1.1.5

**Loading.** ``LibMTL/__init__.py`` imports its architectures and models, which need
torchvision; the weighting modules do not. We import ``LibMTL.weighting.<Method>`` without
running either package ``__init__``: two empty package modules carrying the real ``__path__``
are put in ``sys.modules`` for the import, then ``sys.modules`` is restored.

**Harness.** A LibMTL weighting is a mixin of its ``Trainer``'s model. The stand-in model has
one shared parameter theta (P zeros) and the losses ``L_i = J_i . theta (+ offset_i)``, so the
per-task gradients LibMTL computes are exactly the rows of J and ``theta.grad`` after
``backward`` is its update. LibMTL allocates its gradient buffers with the default dtype
(float32), so its calls run under ``torch.set_default_dtype(torch.float64)``: the comparisons
measure the algorithms, not float32 rounding. ``zero_grad_share_params`` zeroes in place:
LibMTL's architectures call ``encoder.zero_grad()``, which sets the gradients to ``None`` since
torch 2.0, and ``AbsWeighting._reset_grad`` then fails with
``'NoneType' object has no attribute 'data'`` (LibMTL 1.1.5 was written for torch 1.x).

**Randomness.** LibMTL's PCGrad and GradVac shuffle with Python's ``random``; we seed it, replay
the same shuffles and feed the resulting orders to our methods (subclasses overriding
``orders``). LibMTL's GradDrop draws U with ``torch.rand_like`` from torch's global generator;
ours takes a generator seeded with the same seed (the same draws). Global RNG states are
restored after each use.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import types

import numpy as np
import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery._libmtl import INSTALL, weighting_module
from gradsurgery.aggregators.pcgrad import project_weights

METHODS = ("PCGrad", "MGDA", "CAGrad", "GradVac", "IMTL", "GradDrop")
RTOL = 1e-4


def _load_libmtl_weightings() -> dict[str, types.ModuleType]:
    """Import ``LibMTL.weighting.<name>`` for each of METHODS without running any ``__init__``
    (``gradsurgery._libmtl``). Returns the modules by name; skips the whole file when LibMTL
    (exactly 1.1.5) is missing or a module fails to import (e.g. scipy missing for CAGrad)."""
    try:
        return {m: weighting_module(m) for m in METHODS}
    except ImportError as error:
        pytest.skip(f"{error} ({INSTALL})", allow_module_level=True)


LIBMTL = _load_libmtl_weightings()


# --------------------------------------------------------------------------- harness


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny products (T x P, P <= 50): intra-op threads only add overhead, up to
    milliseconds a product on a busy machine. One thread for this file, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _python_random(seed: int):
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@functools.cache
def _stand_in_class(name: str) -> type:
    base = getattr(LIBMTL[name], name)

    class StandIn(base):
        """The trainer attributes and methods LibMTL's weightings use, around theta."""

        def get_share_params(self):
            return [self.theta]

        def zero_grad_share_params(self):
            if self.theta.grad is not None:
                self.theta.grad.zero_()

    StandIn.__name__ = f"LibMTL{name}"
    return StandIn


def libmtl(name: str, tasks: int, size: int) -> nn.Module:
    """A LibMTL weighting ready to run on T x P Jacobians (parameter gradients)."""
    with _float64():
        method = _stand_in_class(name)()
        method.theta = nn.Parameter(torch.zeros(size))
        method.task_num = tasks
        method.task_name = [str(i) for i in range(tasks)]
        method.device = torch.device("cpu")
        method.rep_grad = False
        method.epoch = 0
        method.init_param()
    return method


def libmtl_update(method: nn.Module, jac: torch.Tensor, offsets=None, **kwargs):
    """LibMTL's update for J (theta.grad after its backward) and what backward returned."""
    with _float64():
        method.theta.grad = None
        losses = jac @ method.theta
        if offsets is not None:
            losses = losses + torch.as_tensor(offsets, dtype=torch.float64)
        returned = method.backward(losses, **kwargs)
        return method.theta.grad.detach().clone(), returned


def libmtl_graddrop(jac: torch.Tensor, features: torch.Tensor, leak: float, seed: int):
    """LibMTL's GradDrop (representation gradients only): J holds dL_i/dZ, Z = ``features``.

    The stand-in encoder output is ``rep = theta * 1`` with theta = Z; each task's loss is
    ``J_i . rep_i`` on its own detached copy ``rep_tasks[i]``, as LibMTL's ``_prepare_rep`` makes
    them. U comes from torch's global generator, seeded with ``seed`` (state restored).
    """
    tasks = jac.shape[0]
    with _float64():
        method = LIBMTL["GradDrop"].GradDrop()
        method.task_num = tasks
        method.task_name = [str(i) for i in range(tasks)]
        method.device = torch.device("cpu")
        method.rep_grad = True
        theta = nn.Parameter(features.clone())
        method.rep = theta * 1.0
        method.rep_tasks = {
            t: method.rep.detach().clone().requires_grad_(True) for t in method.task_name
        }
        losses = torch.stack(
            [
                (jac[i].reshape(features.shape) * method.rep_tasks[t]).sum()
                for i, t in enumerate(method.task_name)
            ]
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            method.backward(losses, leak=leak)
    return theta.grad.reshape(-1)


def random_jacobians(count, seed, tasks=(2, 10), full_rank=False, conflict=None):
    """Float64 Jacobians, T in ``tasks``, P in 5..50 (P >= T when ``full_rank``).

    Alternately with conflicts (some g_i . g_j < 0) and without (every g_i . g_j > 0), unless
    ``conflict`` forces one kind; row norms vary over two decades.
    """
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        t = int(rng.integers(tasks[0], tasks[1] + 1))
        p = int(rng.integers(max(5, t) if full_rank else 5, 51))
        conflicting = (k % 2 == 0) if conflict is None else conflict
        while True:
            if conflicting:
                jac = rng.standard_normal((t, p))
            else:
                jac = rng.standard_normal(p) + 0.5 * rng.standard_normal((t, p))
            jac *= 10.0 ** rng.uniform(-1.0, 1.0, (t, 1))
            gram = jac @ jac.T
            if (gram < 0).any() if conflicting else (gram > 0).all():
                break
        out.append(torch.tensor(jac))
    return out


def assert_update_close(ours, theirs, rtol=RTOL):
    """Elementwise rtol, with an absolute floor of rtol times the largest entry."""
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * float(theirs.abs().max()))


def relative_gap(ours, theirs) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


# --------------------------------------------------------------------------- PCGrad


def _libmtl_pcgrad_shuffles(tasks: int) -> list[list[int]]:
    """The shuffles LibMTL's PCGrad draws: for each task i, all T tasks (i included)."""
    shuffles = []
    for _ in range(tasks):
        order = list(range(tasks))
        random.shuffle(order)
        shuffles.append(order)
    return shuffles


class ReplayedPCGrad(gs.PCGrad):
    """Our PCGrad with LibMTL's orders (its shuffles with task i itself removed)."""

    def orders(self, n):
        rows = [[j for j in s if j != i] for i, s in enumerate(_libmtl_pcgrad_shuffles(n))]
        return torch.tensor(rows, dtype=torch.long).reshape(n, n - 1)


def pcgrad_gradient_space(jac, orders):
    """Algorithm 1 on the gradients, visiting for task i exactly the tasks in ``orders[i]``."""
    out = torch.zeros(jac.shape[1], dtype=jac.dtype)
    for i, order in enumerate(orders):
        g = jac[i].clone()
        for j in order:
            dot = g @ jac[j]
            if dot < 0:
                g = g - dot / (jac[j] @ jac[j]) * jac[j]
        out += g
    return out


@pytest.mark.reference
def test_pcgrad_matches_libmtl_with_its_orders():
    """200 Jacobians, T = 2..10: same update (the sum of the g_i') and the same weights."""
    for k, jac in enumerate(random_jacobians(200, seed=10)):
        t, p = jac.shape
        with _python_random(k):
            theirs, their_weights = libmtl_update(libmtl("PCGrad", t, p), jac)
        with _python_random(k):
            ours = ReplayedPCGrad(seed=0).aggregate(jac)
        assert_update_close(ours, theirs)
        with _python_random(k):
            order = ReplayedPCGrad(seed=0).orders(t)
        weights = project_weights(jac @ jac.T, order)
        assert_update_close(weights, torch.as_tensor(their_weights))


@pytest.mark.reference
def test_pcgrad_libmtl_also_projects_a_task_on_its_own_gradient():
    """LibMTL (like the authors' TF code and Pytorch-PCGrad) shuffles *all* tasks for task i,
    i included: when earlier projections have turned g_i' against g_i itself (possible from
    T = 3, likelier in few dimensions), it projects g_i' on g_i's normal plane too. The paper's
    Algorithm 1 (and ours, and torchjd) only visits the other tasks. Never seen on the random
    Jacobians above (P >= 5); here P = 2.
    """
    jac = torch.tensor(
        [
            [-0.8919953148065625, -1.509107744632202],
            [0.3703935333738153, 1.4565026067903366],
            [0.9398099079535257, 0.7748488177844168],
        ],
        dtype=torch.float64,
    )
    with _python_random(3):
        theirs, _ = libmtl_update(libmtl("PCGrad", 3, 2), jac)
    with _python_random(3):
        shuffles = _libmtl_pcgrad_shuffles(3)
    with _python_random(3):
        ours = ReplayedPCGrad(seed=0).aggregate(jac)
    others = [[j for j in s if j != i] for i, s in enumerate(shuffles)]
    torch.testing.assert_close(theirs, pcgrad_gradient_space(jac, shuffles))
    torch.testing.assert_close(ours, pcgrad_gradient_space(jac, others))
    assert relative_gap(ours, theirs) > 0.1


# --------------------------------------------------------------------------- GradVac


class ReplayedGradVac(gs.GradVac):
    """Our GradVac with LibMTL's orders (for task i: the others, shuffled with ``random``)."""

    def orders(self, n):
        rows = []
        for i in range(n):
            order = list(range(n))
            order.remove(i)
            random.shuffle(order)
            rows.append(order)
        return torch.tensor(rows, dtype=torch.long).reshape(n, n - 1)


@pytest.mark.reference
def test_gradvac_first_step_matches_libmtl():
    """From phi = 0, one step: the same update for every Jacobian (the corrections only read
    the targets before the step); the targets then differ exactly as the EMA placement says:
    LibMTL's phi_ij = min(ours, 0), since it only updates a target when it corrects."""
    beta = 0.5  # LibMTL's default
    for k, jac in enumerate(random_jacobians(200, seed=20)):
        t, p = jac.shape
        theirs_method = libmtl("GradVac", t, p)
        with _python_random(k):
            theirs, _ = libmtl_update(theirs_method, jac, beta=beta)
        ours_method = ReplayedGradVac(beta=beta, seed=0)
        with _python_random(k):
            ours = ours_method.aggregate(jac)
        assert_update_close(ours, theirs)
        phi = ours_method.targets([str(i) for i in range(t)])
        torch.testing.assert_close(theirs_method.rho_T, phi.clamp(max=0.0))


@pytest.mark.reference
def test_gradvac_libmtl_ema_only_moves_on_corrections():
    """LibMTL updates phi_ij only inside ``if rho_ij < phi_ij``: from 0 its targets can only
    fall, so it never pulls aligned gradients closer (the paper's Algorithm 1 updates phi after
    every visited pair). Step 1: cos = 0.8, no correction anywhere; ours phi = 0.4, LibMTL's 0.
    Step 2: cos = 0.2: ours corrects both tasks up to cos 0.4, LibMTL returns the plain sum."""
    beta = 0.5
    first = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)
    second = torch.tensor([[2.0, 0.0], [0.2, 0.2 * 24**0.5]], dtype=torch.float64)  # cos 0.2
    theirs_method, ours_method = libmtl("GradVac", 2, 2), gs.GradVac(beta=beta, seed=0)

    theirs, _ = libmtl_update(theirs_method, first, beta=beta)
    ours = ours_method.aggregate(first)
    torch.testing.assert_close(theirs, first.sum(dim=0))  # nothing to correct in either
    torch.testing.assert_close(ours, theirs)
    off_diagonal = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(theirs_method.rho_T, 0.0 * off_diagonal)
    torch.testing.assert_close(ours_method.targets(["0", "1"]), 0.4 * off_diagonal)

    theirs, _ = libmtl_update(theirs_method, second, beta=beta)
    weights = ours_method(second @ second.T)  # the step's weights: our update is weights @ J
    torch.testing.assert_close(theirs, second.sum(dim=0))
    torch.testing.assert_close(theirs_method.rho_T, 0.0 * off_diagonal)
    assert relative_gap(weights @ second, theirs) > 0.05
    # w = 1^T C, so g_0' = g_0 + (w_1 - 1) g_1 and g_1' = g_1 + (w_0 - 1) g_0: both at cos 0.4
    g0, g1 = second
    cosine = torch.nn.functional.cosine_similarity
    target = torch.tensor(0.4, dtype=torch.float64)
    torch.testing.assert_close(cosine(g0 + (weights[1] - 1) * g1, g1, dim=0), target)
    torch.testing.assert_close(cosine(g1 + (weights[0] - 1) * g0, g0, dim=0), target)
    torch.testing.assert_close(ours_method.targets(["0", "1"]), 0.3 * off_diagonal)


# --------------------------------------------------------------------------- MGDA


class _Runaway(Exception):
    pass


class _CountingTorch:
    """Stands in for ``torch`` inside LibMTL's MGDA module: its solver loop calls
    ``torch.matmul`` once per iteration (nothing else there does), so this counts iterations
    and raises past ``limit`` (LibMTL 1.1.5's loop has no working cap, see below)."""

    def __init__(self, limit: int) -> None:
        self.iterations = 0
        self.limit = limit

    def __getattr__(self, name):
        return getattr(torch, name)

    def matmul(self, *args, **kwargs):
        self.iterations += 1
        if self.iterations > self.limit:
            raise _Runaway
        return torch.matmul(*args, **kwargs)


@contextlib.contextmanager
def _counting_mgda(limit: int = 20_000):
    module = LIBMTL["MGDA"]
    counter = _CountingTorch(limit)
    module.torch = counter
    try:
        yield counter
    finally:
        module.torch = torch


def _normalizers(jac, offsets, mode):
    """MGDA's n_i: 1, ||g_i||, L_i or L_i ||g_i|| (the losses are the offsets: theta = 0)."""
    norms = jac.norm(dim=1)
    losses = torch.as_tensor(offsets, dtype=jac.dtype)
    if mode == "none":
        return torch.ones_like(norms)
    return {"l2": norms, "loss": losses, "loss+": losses * norms}[mode]


@pytest.mark.reference
@pytest.mark.parametrize("solver", ["frank-wolfe", "exact"])
def test_mgda_two_conflicting_tasks_match_libmtl(solver):
    """T = 2 with g_1 . g_2 < 0 (an interior optimum, where both use the closed form), 200
    Jacobians over the four normalisations. The weights agree; LibMTL backpropagates the
    normalised gradients (update J^T (a / n)) where ours weights the unnormalised ones (J^T a):
    equal for ``"none"``."""
    rng = np.random.default_rng(30)
    modes = ("none", "l2", "loss", "loss+")
    for k, jac in enumerate(random_jacobians(200, seed=31, tasks=(2, 2), conflict=True)):
        mode = modes[k % 4]
        offsets = rng.uniform(0.1, 5.0, 2)
        theirs, their_weights = libmtl_update(
            libmtl("MGDA", 2, jac.shape[1]), jac, offsets, mgda_gn=mode
        )
        method = gs.MGDA(normalization=mode, solver=solver)
        losses = torch.as_tensor(offsets)
        weights = method(jac @ jac.T, losses)
        assert_update_close(weights, torch.as_tensor(their_weights))
        assert_update_close((weights / _normalizers(jac, offsets, mode)) @ jac, theirs)
        if mode == "none":
            assert_update_close(method.aggregate(jac, losses), theirs)


@pytest.mark.reference
def test_mgda_libmtl_stops_short_of_the_end_points():
    """When one gradient alone is the min-norm point (g_1 . g_2 >= ||g_1||^2), LibMTL's
    two-point solver (from the authors' code) returns 0.999 / 0.001, ours exactly 1 / 0."""
    jac = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    theirs, their_weights = libmtl_update(libmtl("MGDA", 2, 2), jac, mgda_gn="none")
    np.testing.assert_allclose(their_weights, [0.999, 0.001])
    for solver in ("frank-wolfe", "exact"):
        ours = gs.MGDA(solver=solver).aggregate(jac)
        torch.testing.assert_close(ours, jac[0])
    torch.testing.assert_close(theirs, 0.999 * jac[0] + 0.001 * jac[1])


@pytest.mark.reference
def test_mgda_libmtl_never_beats_the_exact_min_norm_point():
    """T = 3..10: LibMTL runs the authors' projected-gradient solver (not Frank-Wolfe), so only
    the min-norm point d* itself is comparable. Every LibMTL answer d is a point of the hull
    (weights on the simplex), so ||d||^2 >= ||d*||^2 and, d* being the hull's nearest point,
    ||d - d*||^2 <= ||d||^2 - ||d*||^2: checks of our exact solver by LibMTL's points.

    LibMTL's loop has no working iteration cap (see below) and costs ~1 ms an iteration here:
    runs past 300 iterations are stopped and not compared (12 Jacobians, not 200)."""
    compared = 0
    for jac in random_jacobians(12, seed=41, tasks=(3, 10), full_rank=True):
        t, p = jac.shape
        try:
            with _counting_mgda(limit=300):
                theirs, weights = libmtl_update(libmtl("MGDA", t, p), jac, mgda_gn="none")
        except _Runaway:
            continue
        compared += 1
        assert weights.min() >= 0.0 and weights.sum() == pytest.approx(1.0)
        exact = gs.MGDA(solver="exact").aggregate(jac)
        best = float(exact @ exact)
        assert float(theirs @ theirs) >= best * (1 - 1e-9)
        distance = float((theirs - exact) @ (theirs - exact))
        assert distance <= float(theirs @ theirs) - best + 1e-9 * best
    assert compared >= 9


def _mgda_case(tasks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 3.0, 10.0, 0.3][:tasks], dtype=torch.float64)
    return torch.randn(tasks, 5, generator=g, dtype=torch.float64) * scales[:, None]


@pytest.mark.reference
def test_mgda_libmtl_iteration_cap_is_never_applied():
    """LibMTL 1.1.5's loop ``while iter_count < MAX_ITER`` (MAX_ITER = 250) never increments
    ``iter_count`` (copied from the authors' ``MinNormSolver``; fixed on LibMTL's GitHub
    master): it only stops on convergence (here after 338 iterations), or never.
    Ours stops at ``max_iter`` (250, the same value)."""
    jac = _mgda_case(3, seed=4)
    with _counting_mgda() as counter:
        theirs, _ = libmtl_update(libmtl("MGDA", 3, 5), jac, mgda_gn="none")
    assert counter.iterations > 250
    method = gs.MGDA()
    ours = method.aggregate(jac)
    assert method.last_iterations <= 250
    exact = gs.MGDA(solver="exact").aggregate(jac)
    assert float(theirs @ theirs) == pytest.approx(float(exact @ exact), rel=1e-6)
    assert float(ours @ ours) == pytest.approx(float(exact @ exact), rel=1e-6)


@pytest.mark.reference
def test_mgda_libmtl_can_stop_far_from_the_min_norm_point():
    """LibMTL's projected-gradient step runs to the nearest face; a weight that is small but
    above 1e-7 (here 8e-7) caps the step, the weights move by less than STOP_CRIT = 1e-5 and
    the loop returns: here at ||d||^2 ~ 3.9 times the minimum. Ours (Frank-Wolfe) gets within
    1e-4 of it, ``"exact"`` to rounding."""
    jac = _mgda_case(4, seed=4)
    with _counting_mgda() as counter:
        theirs, weights = libmtl_update(libmtl("MGDA", 4, 5), jac, mgda_gn="none")
    assert counter.iterations < 20
    assert 0.0 < weights.min() < 1e-5
    exact = gs.MGDA(solver="exact").aggregate(jac)
    best = float(exact @ exact)
    assert float(theirs @ theirs) > 3.0 * best
    ours = gs.MGDA().aggregate(jac)
    assert float(ours @ ours) == pytest.approx(best, rel=1e-4)


@pytest.mark.reference
def test_mgda_libmtl_fails_on_large_gradients():
    """LibMTL's pair search starts from ``dmin = 1e8`` and only sets its answer for a cheaper
    pair: when every pair's min norm^2 is >= 1e8 (gradients of norm ~1e4 and more) the answer
    is never assigned. Ours is scale-free."""
    jac = 1e5 * torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]).double()
    with pytest.raises(UnboundLocalError):
        libmtl_update(libmtl("MGDA", 3, 3), jac, mgda_gn="none")
    small = gs.MGDA(solver="exact")(jac @ jac.T / 1e10)
    for solver in ("frank-wolfe", "exact"):
        weights = gs.MGDA(solver=solver)(jac @ jac.T)
        torch.testing.assert_close(weights, small, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- CAGrad


@contextlib.contextmanager
def _tight_slsqp():
    """LibMTL's CAGrad calls ``scipy.optimize.minimize`` (SLSQP, ftol 1e-6): tighten it."""
    module = LIBMTL["CAGrad"]
    loose = module.minimize
    module.minimize = functools.partial(
        loose, method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000}
    )
    try:
        yield
    finally:
        module.minimize = loose


@pytest.mark.reference
def test_cagrad_matches_libmtl_with_a_tight_inner_solver():
    """T = 3 (the only T LibMTL 1.1.5 runs, see below), 200 Jacobians, three (c, rescale):
    the same mean-based update (neither multiplies by T) and the same rescalings, once
    LibMTL's SLSQP is run to convergence."""
    settings = ((0.5, 1), (0.4, 0), (0.8, 2))  # (0.5, 1) is LibMTL's default
    with _tight_slsqp():
        for k, jac in enumerate(random_jacobians(200, seed=50, tasks=(3, 3))):
            c, rescale = settings[k % 3]
            method = libmtl("CAGrad", 3, jac.shape[1])
            theirs, _ = libmtl_update(method, jac, calpha=c, rescale=rescale)
            ours = gs.CAGrad(c=c, rescale=rescale).aggregate(jac)
            assert_update_close(ours, theirs)


def cagrad_dual(gram, w, c):
    """CAGrad's inner objective (Eq. 4): g_w . g_0 + c ||g_0|| ||g_w||, on the Gramian."""
    t = gram.shape[0]
    g0_norm = math.sqrt(float(gram.sum())) / t
    return float(w @ gram.sum(dim=1)) / t + c * g0_norm * math.sqrt(float(w @ gram @ w))


@pytest.mark.reference
def test_cagrad_libmtl_default_solver_is_looser_never_better():
    """With LibMTL's default SLSQP tolerance (ftol 1e-6) the updates differ by up to ~1e-3
    (relative); the inner weights w it returns never beat ours on the inner objective. Ours,
    w*, is read off our final weights: with ``rescale=0`` they are 1/T + (c ||g_0|| / ||g_w*||)
    w*, so w* is their excess over 1/T, normalised to sum 1."""
    c, worst = 0.5, 0.0
    for jac in random_jacobians(40, seed=51, tasks=(3, 3)):
        theirs, their_w = libmtl_update(libmtl("CAGrad", 3, jac.shape[1]), jac, calpha=c, rescale=0)
        ours = gs.CAGrad(c=c, rescale=0).aggregate(jac)
        gram = jac @ jac.T
        excess = gs.CAGrad(c=c, rescale=0)(gram) - 1.0 / 3
        ours_w = excess / excess.sum()
        scale = float(jac.mean(dim=0).norm() * jac.norm(dim=1).max())
        best = cagrad_dual(gram, ours_w, c)
        assert best <= cagrad_dual(gram, torch.as_tensor(their_w), c) + 1e-10 * scale
        worst = max(worst, relative_gap(ours, theirs))
    assert worst < 1e-2


@pytest.mark.reference
@pytest.mark.parametrize("tasks", [2, 4])
def test_cagrad_libmtl_only_runs_three_tasks(tasks):
    """LibMTL 1.1.5's objective hard-codes ``x.reshape(1, 3)``: any T != 3 raises."""
    jac = random_jacobians(1, seed=52, tasks=(tasks, tasks))[0]
    with pytest.raises(ValueError, match="into shape"):
        libmtl_update(libmtl("CAGrad", tasks, jac.shape[1]), jac, calpha=0.5, rescale=1)
    assert torch.isfinite(gs.CAGrad(c=0.5).aggregate(jac)).all()


# --------------------------------------------------------------------------- IMTL-G


@pytest.mark.reference
def test_imtlg_matches_libmtl():
    """200 full-rank Jacobians (P >= T): LibMTL's IMTL (the paper's closed form, with IMTL-L's
    loss scales e^s L - s at their initial s = 0, which leave the gradients unchanged) gives
    our weights and update."""
    for jac in random_jacobians(200, seed=60, full_rank=True):
        t, p = jac.shape
        theirs, their_weights = libmtl_update(libmtl("IMTL", t, p), jac)
        assert_update_close(gs.IMTLG().aggregate(jac), theirs)
        assert_update_close(gs.IMTLG()(jac @ jac.T), torch.as_tensor(their_weights))


@pytest.mark.reference
def test_imtlg_singular_jacobians_differ_as_documented():
    """Ours uses the pseudo-inverse; LibMTL inverts D U^T. Duplicate gradients: LibMTL raises.
    T = rank J + 1: LibMTL's equal-projection solution is d = 0; ours is the least-squares
    one (equal projections as nearly as possible). A zero gradient: LibMTL gives NaN, ours
    gives that task weight 0."""
    g = torch.Generator().manual_seed(61)
    jac = torch.randn(3, 6, generator=g, dtype=torch.float64)
    jac[1] = jac[0]
    with pytest.raises(torch.linalg.LinAlgError):
        libmtl_update(libmtl("IMTL", 3, 6), jac)
    ours = gs.IMTLG().aggregate(jac)
    projections = (jac / jac.norm(dim=1, keepdim=True)) @ ours
    torch.testing.assert_close(projections, projections[0].expand(3))

    jac = torch.randn(4, 3, generator=g, dtype=torch.float64)
    theirs, _ = libmtl_update(libmtl("IMTL", 4, 3), jac)
    assert float(theirs.norm()) < 1e-10 * float(jac.norm())
    assert float(gs.IMTLG().aggregate(jac).norm()) > 1e-3 * float(jac.norm())

    jac = torch.randn(3, 6, generator=g, dtype=torch.float64)
    jac[2] = 0.0
    theirs, _ = libmtl_update(libmtl("IMTL", 3, 6), jac)
    assert torch.isnan(theirs).all()
    weights = gs.IMTLG()(jac @ jac.T)
    assert weights[2] == 0.0
    torch.testing.assert_close(gs.IMTLG().aggregate(jac), gs.IMTLG().aggregate(jac[:2]))


# --------------------------------------------------------------------------- GradDrop


@pytest.mark.reference
def test_graddrop_matches_libmtl_on_features():
    """LibMTL's GradDrop needs representation gradients: J holds dL_i/dZ for features Z of
    shape (batch, F). 200 cases, T = 2..10, batch 1..3, F = 5..50, leak 0 and 0.3, the same U
    (same seed): the same update on Z."""
    rng = np.random.default_rng(70)
    for k in range(200):
        t = int(rng.integers(2, 11))
        batch = int(rng.integers(1, 4))
        width = int(rng.integers(5, 51))
        jac = torch.tensor(rng.standard_normal((t, batch * width)))
        jac *= torch.tensor(10.0 ** rng.uniform(-1.0, 1.0, (t, 1)))
        features = torch.tensor(rng.standard_normal((batch, width)))
        leak = (0.0, 0.3)[k % 2]
        theirs = libmtl_graddrop(jac, features, leak, seed=k)
        method = gs.GradDrop(leak=leak, generator=torch.Generator().manual_seed(k))
        assert_update_close(method(jac, features=features), theirs)


@pytest.mark.reference
def test_graddrop_on_parameters_is_libmtl_with_a_positive_single_row_representation():
    """LibMTL has no parameter-gradient GradDrop (it raises); ours without features uses
    s_i = g_i, which is LibMTL's statistic sum_batch sign(Z) dL_i/dZ for one positive row."""
    jac = random_jacobians(1, seed=71)[0]
    with pytest.raises(ValueError, match="rep_grad=False"):
        libmtl_update(libmtl("GradDrop", *jac.shape), jac, leak=0.0)
    for k, jac in enumerate(random_jacobians(30, seed=72)):
        g = torch.Generator().manual_seed(k)
        positive = torch.rand(1, jac.shape[1], generator=g, dtype=torch.float64) + 0.5
        theirs = libmtl_graddrop(jac, positive, 0.0, seed=k)
        ours = gs.GradDrop(generator=torch.Generator().manual_seed(k))(jac)
        assert_update_close(ours, theirs)
