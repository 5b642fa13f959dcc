"""Hugging Face: multi-task fine-tuning of a pretrained encoder with PCGrad (CS224N's setup).

The default final project of Stanford's CS224N (the "minBERT" multi-task project) fine-tunes
one BERT encoder on three sentence-level tasks:

==========  ==========================  ==================  ===============================
task        data (CS224N file)          output              loss / dev metric
==========  ==========================  ==================  ===============================
``sst``     SST-5 (ids-sst-*.csv)       5 sentiment classes cross-entropy / accuracy
``para``    Quora (quora-*.csv)         paraphrase or not   binary cross-entropy / accuracy
``sts``     STS-B (sts-*.csv)           similarity in 0-5   mean squared error / Pearson r
==========  ==========================  ==================  ===============================

The model (:class:`MultitaskEncoder`): any ``transformers.AutoModel`` encoder, its pooled
[CLS] representation (BERT's pooler output, or the first token's hidden state for encoders
without a pooler), a shared fine-tuning layer (dropout, Linear(h, h), GELU) and one linear
head per task. A sentence pair is encoded jointly (``[CLS] s1 [SEP] s2 [SEP]``). The encoder
and the shared layer are the *shared parameters*; the heads are task parameters.

Each training step draws one batch per task (the data sets differ in size: the smaller ones
are cycled, see ``--steps-per-epoch``), computes the three losses and calls::

    gs.backward(losses, shared=model.shared_parameters(), method=gs.PCGrad(seed=seed))

so the encoder and the shared layer receive PCGrad's update (each task's gradient projected
off the others' where they conflict; Yu et al. 2020, arXiv:2001.06782) and each head its own
task's gradient. ``--method`` takes any registry name (``equal`` is the plain summed loss).

Single-task baselines (``--mode single``): one fresh model per task, from the same
pretrained weights, trained on that task alone (same steps, same batches). ``--mode both``
runs the baselines and the multi-task model and prints delta-m (the mean relative change of
the three dev metrics against single-task, in percent; positive is better).

Running on the real data
------------------------
Get the CS224N project's data files (tab-separated with a header row: SST has the columns
``id, sentence, sentiment`` with labels 0-4; Quora ``id, sentence1, sentence2, is_duplicate``;
STS ``id, sentence1, sentence2, similarity`` in [0, 5]; rows that do not parse are skipped)
and a pretrained encoder (a hub name such as ``bert-base-uncased``, downloaded once by
``transformers`` into its cache, or a local directory)::

    python examples/hf_multitask.py --model bert-base-uncased \\
        --sst-train data/ids-sst-train.csv --sst-dev data/ids-sst-dev.csv \\
        --para-train data/quora-train.csv --para-dev data/quora-dev.csv \\
        --sts-train data/sts-train.csv --sts-dev data/sts-dev.csv \\
        --mode both --epochs 10 --lr 1e-5 --batch-size 32 --device cuda

Costs: PCGrad needs each task's gradient on every shared parameter, so the T x P Jacobian
(3 x 110M numbers, 1.3 GB in float32, for BERT-base) is held during the backward; the three
per-task backward passes together cost about one backward of the summed loss, because each
task's loss only reaches its own batch's graph.

Without data (``--synthetic``): a tiny randomly initialised BERT (``BertConfig``, nothing
downloaded) on generated token sequences with the same three task shapes; a smoke test of the
whole pipeline in seconds, not a benchmark::

    python examples/hf_multitask.py --synthetic --mode both --epochs 2

Needs ``pip install 'gradsurgery[hf]'`` (``transformers``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradsurgery as gs
from gradsurgery.training.metrics import delta_m

TASKS = ("sst", "para", "sts")
NUM_SENTIMENTS = 5
#: the dev metric of each task (all higher-is-better)
METRICS = {"sst": "accuracy", "para": "accuracy", "sts": "pearson"}

Example = tuple[Any, ...]  # (sentence, label) or (sentence1, sentence2, label)
Encode = Callable[[Sequence[Any], Sequence[Any] | None], dict[str, Tensor]]
Batch = tuple[dict[str, Tensor], Tensor]  # (encoder inputs, labels)


# ---------------------------------------------------------------------- the model


class MultitaskEncoder(nn.Module):
    """A shared encoder and fine-tuning layer, one head per task (sst, para, sts).

    ``forward(task, inputs)`` returns the sentiment logits (B, 5), the paraphrase logit (B,)
    or the similarity score (B,). :meth:`shared_parameters` are the encoder's and the shared
    layer's; :meth:`task_parameters` the task's head.

    Args:
        encoder: a ``transformers`` encoder (``AutoModel``): called with ``input_ids``,
            ``attention_mask`` (and ``token_type_ids`` when given), it returns an output with
            ``last_hidden_state`` and, for BERT-like models, ``pooler_output``.
        hidden_size: the encoder's hidden size (``encoder.config.hidden_size``).
        dropout: dropout before the shared layer.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.shared = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size), nn.GELU()
        )
        self.heads = nn.ModuleDict(
            {
                "sst": nn.Linear(hidden_size, NUM_SENTIMENTS),
                "para": nn.Linear(hidden_size, 1),
                "sts": nn.Linear(hidden_size, 1),
            }
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.shared.parameters()]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.heads[task].parameters())

    def embed(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The shared representation: the pooled [CLS] through the shared layer, (B, h)."""
        out = self.encoder(**inputs)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # encoders without a pooler: the [CLS] (first) token's state
            pooled = out.last_hidden_state[:, 0]
        return self.shared(pooled)

    def forward(self, task: str, inputs: Mapping[str, Tensor]) -> Tensor:
        out = self.heads[task](self.embed(inputs))
        return out if task == "sst" else out.squeeze(-1)


def task_loss(model: MultitaskEncoder, task: str, batch: Batch) -> Tensor:
    """The task's loss on a batch: cross-entropy, binary cross-entropy, or squared error."""
    inputs, labels = batch
    out = model(task, inputs)
    if task == "sst":
        return F.cross_entropy(out, labels)
    if task == "para":
        return F.binary_cross_entropy_with_logits(out, labels.to(out.dtype))
    return F.mse_loss(out, labels.to(out.dtype))


def train_step(
    model: MultitaskEncoder,
    batches: Mapping[str, Batch],
    method: gs.Method,
    optimizer: torch.optim.Optimizer,
    autocast: torch.autocast | None = None,
) -> gs.BackwardResult:
    """One step: a batch per task, the losses, ``gs.backward`` with the method, the update.

    With one task in ``batches`` this is single-task training (the method has nothing to
    combine). The method's training-loop hooks are called, so stateful methods work too.
    """

    def losses_on(batches: Mapping[str, Batch]) -> dict[str, Tensor]:
        if autocast is None:
            return {t: task_loss(model, t, b) for t, b in batches.items()}
        with autocast:
            return {t: task_loss(model, t, b) for t, b in batches.items()}

    losses = losses_on(batches)
    optimizer.zero_grad(set_to_none=True)
    result = gs.backward(losses, shared=model.shared_parameters(), method=method)
    optimizer.step()

    def recompute() -> dict[str, Tensor]:  # FAMO: the same batches after the step
        with torch.no_grad():
            return losses_on(batches)

    method.after_step(recompute)
    return result


@torch.no_grad()
def evaluate(
    model: MultitaskEncoder, data: Mapping[str, Sequence[Example]], encode: Encode, batch_size: int
) -> dict[str, float]:
    """Dev metrics: sentiment accuracy, paraphrase accuracy, similarity Pearson r."""
    was_training = model.training
    model.eval()
    scores: dict[str, float] = {}
    device = next(model.parameters()).device
    for task, examples in data.items():
        preds, golds = [], []
        for start in range(0, len(examples), batch_size):
            inputs, labels = collate(task, examples[start : start + batch_size], encode)
            out = model(task, {k: v.to(device) for k, v in inputs.items()}).float().cpu()
            if task == "sst":
                preds.append(out.argmax(-1))
            elif task == "para":
                preds.append((out > 0).long())
            else:
                preds.append(out)
            golds.append(labels)
        pred, gold = torch.cat(preds), torch.cat(golds)
        if task == "sts":
            scores[task] = float(torch.corrcoef(torch.stack([pred, gold.float()]))[0, 1])
        else:
            scores[task] = float((pred == gold).float().mean())
    model.train(was_training)
    return scores


# ---------------------------------------------------------------------- data


def _rows(path: str | Path) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter="\t")


def load_sst(path: str | Path) -> list[Example]:
    """SST-5 as in CS224N: ``(sentence, label 0-4)`` from the ``sentence``/``sentiment`` columns."""
    out = []
    for row in _rows(path):
        try:
            out.append((row["sentence"].strip(), int(row["sentiment"])))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # a malformed row
    return _nonempty(out, path)


def load_pairs(path: str | Path, label: str, cast: Callable[[str], Any]) -> list[Example]:
    """Sentence pairs ``(sentence1, sentence2, label)``; ``label`` is the column name."""
    out = []
    for row in _rows(path):
        try:
            out.append((row["sentence1"].strip(), row["sentence2"].strip(), cast(row[label])))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # Quora's file has a few rows that do not parse
    return _nonempty(out, path)


def _nonempty(examples: list[Example], path: str | Path) -> list[Example]:
    if not examples:
        raise ValueError(f"{path}: no usable rows (expected a tab-separated file with a header)")
    return examples


def collate(task: str, examples: Sequence[Example], encode: Encode) -> Batch:
    """Encoder inputs and labels of a list of examples (pairs are encoded jointly)."""
    if task == "sst":
        inputs = encode([e[0] for e in examples], None)
        labels = torch.tensor([e[1] for e in examples], dtype=torch.long)
    else:
        inputs = encode([e[0] for e in examples], [e[1] for e in examples])
        dtype = torch.long if task == "para" else torch.float32
        labels = torch.tensor([e[2] for e in examples], dtype=dtype)
    return dict(inputs), labels


def tokenizer_encode(tokenizer: Any, max_length: int) -> Encode:
    """An :data:`Encode` from a ``transformers`` tokenizer (padding to the batch's longest)."""

    def encode(first: Sequence[str], second: Sequence[str] | None) -> dict[str, Tensor]:
        enc = tokenizer(
            list(first),
            None if second is None else list(second),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return dict(enc)

    return encode


def ids_encode(cls_id: int = 1, sep_id: int = 2, pad_id: int = 0) -> Encode:
    """An :data:`Encode` for sentences given as token-id lists (the synthetic data)."""

    def encode(first: Sequence[Sequence[int]], second: Sequence[Sequence[int]] | None):
        rows, types = [], []
        for i, a in enumerate(first):
            ids = [cls_id, *a, sep_id]
            tt = [0] * len(ids)
            if second is not None:
                ids += [*second[i], sep_id]
                tt += [1] * (len(second[i]) + 1)
            rows.append(ids)
            types.append(tt)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, tt) in enumerate(zip(rows, types)):
            input_ids[i, : len(r)] = torch.tensor(r)
            token_type_ids[i, : len(r)] = torch.tensor(tt)
            attention_mask[i, : len(r)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }

    return encode


def synthetic_data(
    n: int, vocab_size: int = 100, length: int = 10, seed: int = 0
) -> dict[str, list[Example]]:
    """Token-id data with the three task shapes (ids 0-2 are PAD, CLS, SEP).

    * ``sst``: a sentence of filler tokens holding one "sentiment" token ``3 + label``.
    * ``para``: a pair whose second sentence is a shuffle of the first (label 1) or an
      unrelated sentence (label 0), half each.
    * ``sts``: a pair sharing ``k`` of its ``length`` tokens, similarity ``5 k / length``.
    """
    if vocab_size < 3 + NUM_SENTIMENTS + length:
        raise ValueError(f"vocab_size {vocab_size} is too small for the synthetic data")
    rng = random.Random(seed)
    fill = range(3 + NUM_SENTIMENTS, vocab_size)

    def sentence() -> list[int]:
        return rng.sample(fill, length)

    sst, para, sts = [], [], []
    for _ in range(n):
        label = rng.randrange(NUM_SENTIMENTS)
        s = sentence()
        s[rng.randrange(length)] = 3 + label
        sst.append((s, label))
        a = sentence()
        if rng.random() < 0.5:
            b = a[:]
            rng.shuffle(b)
            para.append((a, b, 1))
        else:
            para.append((a, sentence(), 0))
        a = sentence()
        k = rng.randint(0, length)
        others = [t for t in fill if t not in a]
        b = rng.sample(a, k) + rng.sample(others, length - k)
        rng.shuffle(b)
        sts.append((a, b, 5.0 * k / length))
    return {"sst": sst, "para": para, "sts": sts}


def _batches(
    examples: Sequence[Example], task: str, encode: Encode, batch_size: int, gen: random.Random
) -> Iterator[Batch]:
    """Shuffled batches forever (a new permutation at each pass over the data)."""
    order = list(range(len(examples)))
    size = min(batch_size, len(order))  # a set smaller than a batch: the whole set each time
    while True:
        gen.shuffle(order)
        for start in range(0, len(order) - size + 1, size):  # the last partial batch is dropped
            chunk = [examples[i] for i in order[start : start + size]]
            yield collate(task, chunk, encode)


# ---------------------------------------------------------------------- training


def train(
    model: MultitaskEncoder,
    train_data: Mapping[str, Sequence[Example]],
    dev_data: Mapping[str, Sequence[Example]],
    encode: Encode,
    method: gs.Method,
    *,
    epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    device: str = "cpu",
    bf16: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train on the tasks of ``train_data`` (one batch of each per step); dev after each epoch.

    Returns ``{"dev": best dev metrics, "epoch": its epoch, "losses": per-step losses}``; the
    epoch kept is the one with the best mean dev metric.
    """
    model.to(device)
    model.train()
    method.to(device)
    params = [*model.parameters(), *method.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)
    autocast = (
        torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if bf16 else None
    )
    streams = {
        t: _batches(train_data[t], t, encode, batch_size, random.Random(f"{seed}-{t}"))
        for t in train_data
    }
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"dev": None, "epoch": 0, "mean": -math.inf}
    for epoch in range(1, epochs + 1):
        sums = dict.fromkeys(train_data, 0.0)
        for _ in range(steps_per_epoch):
            batches = {}
            for t, stream in streams.items():
                inputs, labels = next(stream)
                batches[t] = ({k: v.to(device) for k, v in inputs.items()}, labels.to(device))
            result = train_step(model, batches, method, optimizer, autocast)
            step = dict(zip(result.tasks, result.losses.tolist()))
            history.append(step)
            for t, v in step.items():
                sums[t] += v
        method.end_epoch({t: s / steps_per_epoch for t, s in sums.items()})
        dev = evaluate(model, {t: dev_data[t] for t in train_data}, encode, 4 * batch_size)
        mean = sum(dev.values()) / len(dev)
        train_loss = ", ".join(f"{t} {s / steps_per_epoch:.3f}" for t, s in sums.items())
        dev_text = ", ".join(f"{t} {METRICS[t]} {v:.3f}" for t, v in dev.items())
        log(f"  epoch {epoch}: train loss {train_loss} | dev {dev_text}")
        if mean > best["mean"]:
            best = {"dev": dev, "epoch": epoch, "mean": mean}
    return {"dev": best["dev"], "epoch": best["epoch"], "losses": history}


def build_method(name: str, tasks: Sequence[str], seed: int) -> gs.Method:
    """A registry method, told the task names and the seed when its constructor takes them."""
    params = inspect.signature(gs.METHODS[name.lower().replace("-", "_")]).parameters
    kwargs: dict[str, Any] = {}
    if "tasks" in params:
        kwargs["tasks"] = list(tasks)
    if "seed" in params:
        kwargs["seed"] = seed
    return gs.make_method(name, **kwargs)


def tiny_bert(
    vocab_size: int = 100, hidden: int = 32, layers: int = 2, heads: int = 2
) -> nn.Module:
    """A small randomly initialised BERT (no download): the synthetic mode's encoder."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    return BertModel(config)


def _pretrained(name: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(name), AutoTokenizer.from_pretrained(name)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the example; returns ``{run: {task: dev metric}}`` (runs: single-task, multi-task)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bert-base-uncased", help="hub name or local directory")
    for t, name in (("sst", "SST-5"), ("para", "Quora"), ("sts", "STS-B")):
        p.add_argument(f"--{t}-train", type=Path, help=f"{name} training file (CS224N format)")
        p.add_argument(f"--{t}-dev", type=Path, help=f"{name} dev file")
    p.add_argument("--synthetic", action="store_true", help="tiny random BERT, generated data")
    p.add_argument("--synthetic-size", type=int, default=256, help="examples per task")
    p.add_argument("--mode", choices=("multi", "single", "both"), default="multi")
    p.add_argument("--tasks", default=",".join(TASKS), help="a subset of sst,para,sts")
    p.add_argument("--method", default="pcgrad", help="a registry name (gs.METHODS)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="default: one pass over the larger of SST and STS (Quora, far larger, is sampled)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="autocast the forward in bfloat16")
    args = p.parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        p.error("this example needs transformers: pip install 'gradsurgery[hf]'")

    if args.method.lower().replace("-", "_") not in gs.METHODS:
        p.error(f"unknown --method {args.method!r}; known: {', '.join(sorted(gs.METHODS))}")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        p.error(f"--tasks must be a subset of {','.join(TASKS)}, got {args.tasks!r}")
    if args.synthetic:
        data = synthetic_data(2 * args.synthetic_size, seed=args.seed)
        n = args.synthetic_size
        train_data = {t: data[t][:n] for t in tasks}
        dev_data = {t: data[t][n:] for t in tasks}
        encode = ids_encode()

        def fresh_encoder() -> nn.Module:
            torch.manual_seed(args.seed)
            return tiny_bert()

        hidden = 32
        if args.lr == p.get_default("lr"):
            args.lr = 1e-3  # a random tiny model needs a larger rate than fine-tuning
    else:
        paths = {t: (getattr(args, f"{t}_train"), getattr(args, f"{t}_dev")) for t in tasks}
        missing = [
            f"--{t}-{s}"
            for t, ps in paths.items()
            for s, v in zip(("train", "dev"), ps)
            if v is None
        ]
        if missing:
            p.error(f"give {' '.join(missing)} (or --synthetic for a run without data)")

        def load(task: str, path: Path) -> list[Example]:
            if task == "sst":
                return load_sst(path)
            if task == "para":
                return load_pairs(path, "is_duplicate", lambda v: int(float(v)))
            return load_pairs(path, "similarity", float)

        train_data = {t: load(t, paths[t][0]) for t in tasks}
        dev_data = {t: load(t, paths[t][1]) for t in tasks}
        encoder, tokenizer = _pretrained(args.model)
        encode = tokenizer_encode(tokenizer, args.max_length)
        hidden = encoder.config.hidden_size
        base_state = {k: v.clone() for k, v in encoder.state_dict().items()}

        def fresh_encoder() -> nn.Module:  # the same pretrained weights for every run
            encoder.load_state_dict(base_state)
            return encoder

    steps = args.steps_per_epoch
    if steps is None:
        sizes = [len(train_data[t]) for t in tasks if t != "para"] or [len(train_data["para"])]
        steps = max(1, math.ceil(max(sizes) / args.batch_size))
    options = {
        "epochs": args.epochs,
        "steps_per_epoch": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "device": args.device,
        "bf16": args.bf16,
    }
    sizes_text = ", ".join(f"{t} {len(train_data[t])}" for t in tasks)
    print(f"train sizes: {sizes_text}; {steps} steps per epoch of one batch per task")

    def new_model() -> MultitaskEncoder:
        torch.manual_seed(args.seed)
        return MultitaskEncoder(fresh_encoder(), hidden, dropout=args.dropout)

    results: dict[str, dict[str, float]] = {}
    if args.mode in ("single", "both"):
        single: dict[str, float] = {}
        for t in tasks:
            print(f"single-task {t}:")
            run = train(
                new_model(), {t: train_data[t]}, dev_data, encode, gs.EqualWeights(), **options
            )
            single[t] = run["dev"][t]
        results["single-task"] = single
    if args.mode in ("multi", "both"):
        method = build_method(args.method, tasks, args.seed)
        name = type(method).__name__
        print(f"multi-task with {name}:")
        run = train(new_model(), train_data, dev_data, encode, method, **options)
        results[name] = run["dev"]

    print("\ndev metrics (best epoch by the mean dev metric):")
    header = "run".ljust(14) + "".join(f"{t} {METRICS[t]}".rjust(16) for t in tasks)
    print(header + ("   delta-m %" if len(results) > 1 else ""))
    for run_name, dev in results.items():
        line = run_name.ljust(14) + "".join(f"{dev[t]:16.4f}" for t in tasks)
        if "single-task" in results and run_name != "single-task":
            base = {t: {METRICS[t]: results["single-task"][t]} for t in tasks}
            up = {t: {METRICS[t]: True} for t in tasks}
            try:
                line += f"{delta_m({t: {METRICS[t]: dev[t]} for t in tasks}, base, up):12.2f}"
            except ValueError:  # a zero or NaN baseline (e.g. constant STS predictions)
                line += "n/a".rjust(12)
        print(line)
    return results


if __name__ == "__main__":
    main()
