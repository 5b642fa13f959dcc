r"""Task grouping from an inter-task affinity matrix (Fifty et al. 2021's network selection).

Given the run's affinity ``Z[i, j] = Z_{i->j}`` (how much a step on task i's gradient lowers
task j's loss; :mod:`gradsurgery.diagnostics.affinity`) and a budget of k groups (k networks
to train: a compute budget of k networks is the same thing), choose the groups.

The objective, as in the paper and its network-selection code (google-research/tag):

* the affinity *onto* task j from a group S that contains it is the mean affinity the other
  members give it, ``s(j, S) = 1/(|S| - 1) * sum_{i in S, i != j} Z[i, j]``; a task alone
  receives none (TAG gives a lone task -1e6, i.e. never picks it unless forced; here
  ``singleton=None`` forbids it, or a number scores it, e.g. 0 for "no transfer");
* groups may **overlap** (the paper allows it: a task may sit in several networks, and is
  served by the one where it receives the most affinity), every task must be in at least one
  group, and at most k groups are chosen;
* the score of a grouping is the mean over tasks of ``max_{S in groups, j in S} s(j, S)``
  (the affinity each task receives from its best group); the chosen grouping maximises it.
  ``overlap=False`` instead asks for a partition (each task in exactly one group).

Exact search (``T <= max_exact``, default 12). A task is *served* by one group, so an
optimal grouping induces a partition of the tasks into at most k blocks, block P served by a
group S containing it. With ``V(P) = max_{S >= P} sum_{j in P} s(j, S)`` (the best group for a
block: extra members may help P's tasks while being served elsewhere), the optimum is the
best partition into at most k blocks of ``sum V(P)``, and conversely the groups ``S(P)`` of
that partition reach it. V is computed over all (block, superset) pairs and the partition by
dynamic programming over subsets: O(3^T) time, O(k 2^T) memory, an exhaustive search in
which every dominated branch is pruned by the DP's max. For partitions, ``V(P)`` is just
``sum_{j in P} s(j, P)``.

Approximate search (``T > max_exact``; a documented approximation, no optimality
guarantee): iterated local search over the serving partition. A block's value is V(P) with
the superset S found greedily (add the helper task that most raises the affinity P receives,
while it rises); the partition into at most k blocks is improved by moving one task or
swapping two, from an average-linkage agglomerative start and ``restarts`` random starts
(seeded), each followed by ``min(T, 10)`` random kicks (three tasks relabelled, then local
search again); overlapping groups are finally polished by adding, removing or replacing one
member at a time. On random 8-10 task matrices it found the exact optimum in 30 of 30 cases
(``tests/test_grouping.py`` checks a sample), and it recovers planted clusters beyond 12
tasks. Time on one CPU core: about 1 s for 14 tasks, 5-15 s for 30, 15-40 s for 40.

Reference: Christopher Fifty, Ehsan Amid, Zhe Zhao, Tianhe Yu, Rohan Anil, Chelsea Finn.
"Efficiently Identifying Task Groupings for Multi-Task Learning". NeurIPS 2021.
arXiv:2109.04617. Network selection as in google-research/tag (TAG_network_selection).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["Grouping", "group_tasks", "grouping_score"]

Method = Literal["auto", "exact", "search"]
_NEG = -math.inf


@dataclass(frozen=True)
class Grouping:
    """The chosen task groups.

    Attributes:
        groups: the groups (task names in task order), at most k; they may overlap.
        served_by: each task's group (index into ``groups``): where it receives the most
            affinity.
        per_task: the affinity each task receives from its serving group.
        score: the mean of ``per_task`` over tasks (the objective; the "expected score").
        total: the sum of ``per_task``.
        exact: whether the exact search produced it (else the approximate search).
        overlap: whether groups were allowed to overlap.
    """

    groups: tuple[tuple[str, ...], ...]
    served_by: dict[str, int]
    per_task: dict[str, float]
    score: float
    total: float
    exact: bool
    overlap: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, numbers and strings (JSON-ready)."""
        return {
            "groups": [list(g) for g in self.groups],
            "served_by": dict(self.served_by),
            "per_task": dict(self.per_task),
            "score": self.score,
            "total": self.total,
            "exact": self.exact,
            "overlap": self.overlap,
        }


def _matrix(affinity: Any, tasks: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    try:
        if hasattr(affinity, "detach"):
            affinity = affinity.detach().cpu().double().numpy()
        a = np.array(affinity, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"affinity must be a T x T matrix of numbers ({e})") from None
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"affinity must be a square T x T matrix, got shape {a.shape}")
    n = a.shape[0]
    if n == 0:
        raise ValueError("affinity is empty: give at least one task")
    names = [str(i) for i in range(n)] if tasks is None else [str(t) for t in tasks]
    if len(names) != n:
        raise ValueError(f"{len(names)} task names for a {n} x {n} affinity matrix")
    if len(set(names)) != n:
        raise ValueError(f"duplicate task names: {names}")
    off = a.copy()
    np.fill_diagonal(off, 0.0)  # the diagonal (a task's effect on itself) is never used
    bad = np.argwhere(~np.isfinite(off))
    if len(bad):
        i, j = bad[0]
        raise ValueError(
            f"affinity {names[i]}->{names[j]} is not finite ({a[i, j]}); every pair must have "
            "been measured (NaN: no step measured it)"
        )
    return off, names


def _singleton_value(singleton: float | None) -> float:
    if singleton is None:
        return _NEG
    if isinstance(singleton, bool) or not isinstance(singleton, int | float):
        raise TypeError(f"singleton must be None or a number, got {type(singleton).__name__}")
    if not math.isfinite(float(singleton)):
        raise ValueError(f"singleton must be finite or None, got {singleton!r}")
    return float(singleton)


def _receive(off: np.ndarray, members: Sequence[int], lone: float) -> np.ndarray:
    """s(j, S) for every j in S (in the order of ``members``)."""
    idx = np.asarray(members, dtype=np.int64)
    if len(idx) == 1:
        return np.array([lone])
    return off[np.ix_(idx, idx)].sum(axis=0) / (len(idx) - 1)


def grouping_score(
    affinity: Any,
    groups: Sequence[Sequence[str | int]],
    tasks: Sequence[str] | None = None,
    *,
    singleton: float | None = None,
) -> tuple[float, dict[str, float], dict[str, int]]:
    """Score a grouping: ``(mean over tasks of the affinity received, per task, served_by)``.

    Each task receives ``max over the groups S containing it of s(j, S)`` (see the module
    docstring). Groups are given by task names (or indices). A task in no group raises
    ``ValueError``; with ``singleton=None`` a task whose only group is itself scores -inf.
    """
    off, names = _matrix(affinity, tasks)
    lone = _singleton_value(singleton)
    idx_groups = _as_indices(groups, names)
    n = len(names)
    best = np.full(n, _NEG)
    served = np.full(n, -1)
    for g, members in enumerate(idx_groups):
        vals = _receive(off, members, lone)
        for j, v in zip(members, vals):
            if served[j] < 0 or v > best[j]:
                best[j], served[j] = v, g
    missing = [names[j] for j in range(n) if served[j] < 0]
    if missing:
        raise ValueError(f"task(s) {missing} are in no group")
    per_task = {names[j]: float(best[j]) for j in range(n)}
    return float(best.mean()), per_task, {names[j]: int(served[j]) for j in range(n)}


def _as_indices(groups: Sequence[Sequence[str | int]], names: list[str]) -> list[list[int]]:
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise TypeError("groups must be a sequence of groups (each a sequence of task names)")
    out = []
    for g in groups:
        if isinstance(g, str) or not isinstance(g, Sequence | set | frozenset):
            raise TypeError(f"each group must be a sequence of task names, got {g!r}")
        members = []
        for t in g:
            if isinstance(t, int | np.integer) and not isinstance(t, bool):
                if not 0 <= int(t) < len(names):
                    raise ValueError(f"task index {t} out of range for {len(names)} tasks")
                members.append(int(t))
            elif str(t) in names:
                members.append(names.index(str(t)))
            else:
                raise ValueError(f"unknown task {t!r}; tasks are {names}")
        if not members:
            raise ValueError("a group is empty")
        if len(set(members)) != len(members):
            raise ValueError(f"group {list(g)} repeats a task")
        out.append(sorted(members))
    if not out:
        raise ValueError("give at least one group")
    return out


def group_tasks(
    affinity: Any,
    k: int,
    tasks: Sequence[str] | None = None,
    *,
    overlap: bool = True,
    singleton: float | None = None,
    method: Method = "auto",
    max_exact: int = 12,
    restarts: int = 8,
    seed: int = 0,
) -> Grouping:
    """Choose at most ``k`` task groups that maximise the affinity each task receives.

    Args:
        affinity: ``Z[i, j] = Z_{i->j}`` (T x T; tensor, array or nested lists); the diagonal
            is ignored, every off-diagonal entry must be finite.
        k: the budget: at most k groups (networks), k >= 1.
        tasks: the task names (default ``"0"``, ``"1"``, ...).
        overlap: allow a task in several groups (the paper's setting, default); ``False``
            asks for a partition.
        singleton: ``None`` (default): no task is left alone (TAG); a number: the score of a
            task alone in its group.
        method: ``"exact"`` (dynamic programming, O(3^T)), ``"search"`` (the approximate
            local search) or ``"auto"``: exact when T <= ``max_exact``.
        max_exact: the largest T searched exactly by ``"auto"`` (12: well under a second;
            each extra task multiplies the time by about 3).
        restarts: random starts of the approximate search (besides the agglomerative one).
        seed: seeds the approximate search's random starts.

    Returns:
        A :class:`Grouping` with the groups, each task's serving group and score, and the
        mean score over tasks.

    Raises:
        ValueError: a matrix that is not square or has non-finite off-diagonal entries, a bad
            ``k``/``method``/``max_exact``/``restarts``, or a single task with
            ``singleton=None``.
    """
    off, names = _matrix(affinity, tasks)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k (the number of groups) must be an int >= 1, got {k!r}")
    if method not in ("auto", "exact", "search"):
        raise ValueError(f"method must be 'auto', 'exact' or 'search', got {method!r}")
    if isinstance(max_exact, bool) or not isinstance(max_exact, int) or not 1 <= max_exact <= 20:
        raise ValueError(f"max_exact must be an int in [1, 20], got {max_exact!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ValueError(f"restarts must be an int >= 0, got {restarts!r}")
    lone = _singleton_value(singleton)
    n = len(names)
    if n == 1 and singleton is None:
        raise ValueError("a single task cannot join a group; pass singleton= to score it alone")
    k = int(k)
    exact = method == "exact" or (method == "auto" and n <= max_exact)
    if method == "exact" and n > 20:
        raise ValueError(f"the exact search is limited to 20 tasks (got {n}); use 'search'")
    if exact:
        groups = _exact(off, k, overlap, lone)
    else:
        groups = _search(off, k, overlap, lone, restarts, np.random.default_rng(seed))
    ordered = _order(groups)
    score, per_task, served = grouping_score(
        off, [[names[j] for j in g] for g in ordered], names, singleton=singleton
    )
    return Grouping(
        groups=tuple(tuple(names[j] for j in g) for g in ordered),
        served_by=served,
        per_task=per_task,
        score=score,
        total=float(sum(per_task.values())),
        exact=exact,
        overlap=overlap,
    )


def _order(groups: list[list[int]]) -> list[list[int]]:
    unique: list[list[int]] = []
    for g in groups:
        g = sorted(set(g))
        if g not in unique:
            unique.append(g)
    return sorted(unique, key=lambda g: (g[0], len(g), g))


# ---------------------------------------------------------------------------------- exact


def _bits(mask: int) -> list[int]:
    out, b = [], 0
    while mask:
        if mask & 1:
            out.append(b)
        mask >>= 1
        b += 1
    return out


def _exact(off: np.ndarray, k: int, overlap: bool, lone: float) -> list[list[int]]:
    """Exact search: V(P) for every block P, then the best partition into <= k blocks.

    Everything is vectorised over the 3^n (set, subset) pairs, built bit by bit.
    """
    n = off.shape[0]
    full = (1 << n) - 1
    masks = np.arange(1 << n, dtype=np.int64)
    size = np.zeros(1 << n, dtype=np.int64)
    colsum = np.zeros((1 << n, n))
    for b in range(n):  # doubling: masks with highest bit b from those below
        size[1 << b : 2 << b] = size[: 1 << b] + 1
        colsum[1 << b : 2 << b] = colsum[: 1 << b] + off[b]
    member = ((masks[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)
    recv = colsum / np.maximum(size - 1, 1)[:, None]  # s(j, S) for j in S when |S| >= 2
    recv[size == 1] = lone
    recv[~member] = 0.0

    if not overlap:  # V(P) = sum_{j in P} s(j, P), served by P itself
        value = np.where(member, recv, 0.0).sum(axis=1)
        if lone == _NEG:
            value[size == 1] = _NEG
        value[0] = _NEG
        serve = masks.copy()
    else:  # V(P) = max over S >= P of sum_{j in P} s(j, S)
        sets = masks[size >= (1 if lone != _NEG else 2)]
        subs = np.zeros_like(sets)
        vals = np.zeros(len(sets))
        for b in range(n):  # each set's sub-blocks, one bit at a time
            has = (sets >> b) & 1 == 1
            sets = np.concatenate([sets, sets[has]])
            vals = np.concatenate([vals, vals[has] + recv[sets[len(subs) :], b]])
            subs = np.concatenate([subs, subs[has] | (1 << b)])
        keep = subs != 0
        sets, subs, vals = sets[keep], subs[keep], vals[keep]
        value = np.full(1 << n, _NEG)
        np.maximum.at(value, subs, vals)
        serve = masks.copy()
        hit = vals >= value[subs]
        serve[subs[hit]] = sets[hit]

    # (block, rest) pairs with block's lowest task the lowest of block | rest: every way to
    # split off the block that holds a set's lowest task
    block = np.zeros(1, dtype=np.int64)
    rest = np.zeros(1, dtype=np.int64)
    for b in range(n):
        bit = 1 << b
        block, rest = (
            np.concatenate([block, block | bit, block]),
            np.concatenate([rest, rest, rest | bit]),
        )
    low = block & -block
    ok = (block != 0) & ((rest == 0) | (low < (rest & -rest)))
    block, rest = block[ok], rest[ok]
    union = block | rest
    order = np.argsort(union, kind="stable")
    block, rest, union = block[order], rest[order], union[order]
    starts = np.flatnonzero(np.r_[True, union[1:] != union[:-1]])
    targets = union[starts]
    vb = value[block]

    best = np.full((k + 1, 1 << n), _NEG)  # best[m, mask]: mask split into <= m blocks
    best[:, 0] = 0.0
    for m in range(1, k + 1):
        cand = vb + best[m - 1, rest]
        best[m, targets] = np.maximum(np.maximum.reduceat(cand, starts), best[m - 1, targets])
    if best[k, full] == _NEG:  # cannot happen for n >= 2 (one block of every task)
        raise ValueError("no feasible grouping: every task needs a group")
    out, mask, m = [], full, k
    while mask:
        if best[m, mask] == best[m - 1, mask]:
            m -= 1
            continue
        seg = np.flatnonzero(union == mask)
        cand = vb[seg] + best[m - 1, rest[seg]]
        chosen = int(block[seg[int(np.argmax(cand))]])
        out.append(_bits(int(serve[chosen])))
        mask ^= chosen
        m -= 1
    return out


# --------------------------------------------------------------------------- approximate


class _Blocks:
    """Block values for the approximate search, cached by block.

    ``value(P)`` is V(P) of the module docstring: ``sum_{j in P} s(j, P)`` for partitions; for
    overlapping groups, the best superset S of P found greedily (add the helper task that
    most raises ``sum_{j in P} s(j, S)`` while it rises), a lower bound of the exact V(P).
    """

    def __init__(self, off: np.ndarray, overlap: bool, lone: float) -> None:
        self.off, self.overlap, self.lone = off, overlap, lone
        self.cache: dict[tuple[int, ...], tuple[float, tuple[int, ...]]] = {}

    def __call__(self, block: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
        hit = self.cache.get(block)
        if hit is None:
            hit = self._greedy(block) if self.overlap else (self._own(block), block)
            self.cache[block] = hit
        return hit

    def _own(self, block: Sequence[int]) -> float:
        return float(_receive(self.off, list(block), self.lone).sum())

    def _greedy(self, block: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
        p = list(block)
        offp = self.off[:, p]  # offp[h, j] = Z[h -> j] for j in P
        rows = offp.sum(axis=1)  # what adding helper h gives P in total
        inside = np.zeros(self.off.shape[0], dtype=bool)
        inside[p] = True
        total = float(offp[p].sum())  # sum over j in P of the affinity received from S
        size = len(p)
        value = total / (size - 1) if size > 1 else self.lone
        while not inside.all():
            trial = np.where(inside, _NEG, (total + rows) / size)
            h = int(np.argmax(trial))
            if not trial[h] > value + 1e-12:
                break
            value, total, size = float(trial[h]), total + float(rows[h]), size + 1
            inside[h] = True
        return value, tuple(np.flatnonzero(inside).tolist())

    def total(self, labels: np.ndarray, k: int) -> float:
        score = 0.0
        for b in range(k):
            members = tuple(np.flatnonzero(labels == b).tolist())
            if members:
                score += self(members)[0]
        return score

    def of(self, members: set[int]) -> float:
        return self(tuple(sorted(members)))[0] if members else 0.0


def _local_search(blocks: _Blocks, labels: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Moves of one task to another (possibly empty) block and swaps of two tasks, first
    improvement, until none improves the sum of block values (each move is scored by the
    two blocks it changes)."""
    n = len(labels)
    labels = labels.copy()
    members = [set(np.flatnonzero(labels == b).tolist()) for b in range(k)]
    vals = [blocks.of(m) for m in members]
    improved = True
    while improved:
        improved = False
        for j in range(n):
            for b in range(k):
                a = int(labels[j])
                if b == a:
                    continue
                na, nb = members[a] - {j}, members[b] | {j}
                va, vb = blocks.of(na), blocks.of(nb)
                if va + vb > vals[a] + vals[b] + 1e-12:
                    members[a], members[b], vals[a], vals[b] = na, nb, va, vb
                    labels[j] = b
                    improved = True
        for j in range(n):
            for l in range(j + 1, n):
                a, b = int(labels[j]), int(labels[l])
                if a == b:
                    continue
                na, nb = (members[a] - {j}) | {l}, (members[b] - {l}) | {j}
                va, vb = blocks.of(na), blocks.of(nb)
                if va + vb > vals[a] + vals[b] + 1e-12:
                    members[a], members[b], vals[a], vals[b] = na, nb, va, vb
                    labels[j], labels[l] = b, a
                    improved = True
    return labels, float(sum(vals))


def _agglomerative(off: np.ndarray, k: int) -> np.ndarray:
    sym = (off + off.T) / 2
    clusters = [[j] for j in range(off.shape[0])]
    while len(clusters) > k:
        best, pair = _NEG, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(sym[np.ix_(clusters[a], clusters[b])].mean())
                if link > best:
                    best, pair = link, (a, b)
        a, b = pair
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    labels = np.zeros(off.shape[0], dtype=np.int64)
    for c, members in enumerate(clusters):
        labels[members] = c
    return labels


def _receive_full(off: np.ndarray, members: Sequence[int], lone: float) -> np.ndarray:
    """s(j, S) for every task j (-inf for tasks outside S)."""
    out = np.full(off.shape[0], _NEG)
    out[list(members)] = _receive(off, list(members), lone)
    return out


def _overlap_score(off: np.ndarray, groups: list[list[int]], lone: float) -> float:
    best = np.full(off.shape[0], _NEG)
    for g in groups:
        best = np.maximum(best, _receive_full(off, g, lone))
    return float(best.sum())


def _grow(off: np.ndarray, groups: list[list[int]], lone: float) -> tuple[list[list[int]], float]:
    """Local search on overlapping groups: add a task to a group, remove one, or replace one
    member by another task; first improvement, until no move improves the score."""
    n = off.shape[0]
    groups = [sorted(g) for g in groups]
    recv = [_receive_full(off, g, lone) for g in groups]
    score = _overlap_score(off, groups, lone)
    for _ in range(50 * n):
        improved = False
        for g in range(len(groups)):
            others = np.full(n, _NEG)
            for h, r in enumerate(recv):
                if h != g:
                    others = np.maximum(others, r)
            members = set(groups[g])
            outside = [i for i in range(n) if i not in members]
            trials = [sorted(members | {i}) for i in outside]
            if len(members) > 1:
                trials += [sorted(members - {i}) for i in members]
                trials += [sorted((members - {i}) | {j}) for i in members for j in outside]
            for trial in trials:
                r = _receive_full(off, trial, lone)
                value = float(np.maximum(others, r).sum())
                if value > score + 1e-12:
                    groups[g], recv[g], score, improved = trial, r, value, True
                    break
            if improved:
                break
        if not improved:
            break
    return groups, score


def _search(
    off: np.ndarray, k: int, overlap: bool, lone: float, restarts: int, rng: np.random.Generator
) -> list[list[int]]:
    """Iterated local search over the serving partition (see :class:`_Blocks`): from each
    start, local search, then ``min(n, 10)`` random kicks (three tasks moved at random), each
    followed by local search, keeping improvements; overlapping groups are then polished by
    :func:`_grow`."""
    n = off.shape[0]
    blocks = _Blocks(off, overlap, lone)
    k_eff = min(k, n if (overlap or lone != _NEG) else max(1, n // 2))
    starts = [_agglomerative(off, k_eff)]
    starts += [rng.integers(0, k_eff, size=n) for _ in range(restarts)]
    best_groups: list[list[int]] | None = None
    best_score = _NEG
    for start in starts:
        labels, score = _local_search(blocks, np.asarray(start, dtype=np.int64), k_eff)
        for _ in range(min(n, 10) if k_eff > 1 else 0):
            kicked = labels.copy()
            moved = rng.choice(n, size=min(n, 3), replace=False)
            kicked[moved] = rng.integers(0, k_eff, size=len(moved))
            kicked, value = _local_search(blocks, kicked, k_eff)
            if value > score + 1e-12:
                labels, score = kicked, value
        members = [tuple(np.flatnonzero(labels == b).tolist()) for b in range(k_eff)]
        groups = [list(blocks(m)[1]) for m in members if m]
        if overlap:
            groups, score = _grow(off, groups, lone)
        else:
            score = _overlap_score(off, groups, lone)
        if best_groups is None or score > best_score + 1e-12:
            best_groups, best_score = groups, score
    assert best_groups is not None
    if best_score == _NEG:
        raise ValueError("no feasible grouping found: every task needs a group")
    return best_groups
