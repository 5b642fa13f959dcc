"""The Hugging Face multi-task example (examples/hf_multitask.py) on a tiny random BERT.

Nothing is downloaded: the encoder is built from a ``BertConfig`` (hidden 32, 2 layers, 2
heads, vocabulary 100), the data are synthetic token ids, and the hub is set offline.
"""

from __future__ import annotations

import copy
import inspect
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

import gradsurgery as gs  # noqa: E402
from conftest import load_script  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "hf_multitask.py"
TASKS = ("sst", "para", "sts")


@pytest.fixture(scope="module")
def ex():
    module = load_script(SCRIPT, "hf_multitask")
    yield module
    sys.modules.pop("hf_multitask", None)


def _model(ex, seed: int = 2):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,  # deterministic forwards: the hand computation must match
        attention_probs_dropout_prob=0.0,
    )
    encoder = transformers.BertModel(config)
    return ex.MultitaskEncoder(encoder, config.hidden_size, dropout=0.0)


def _batches(ex, n: int = 16, seed: int = 0):
    data = ex.synthetic_data(n, seed=seed)
    encode = ex.ids_encode()
    return {t: ex.collate(t, data[t], encode) for t in TASKS}


def _flat_grads(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [torch.zeros_like(p).flatten() if g is None else g.flatten() for p, g in zip(params, grads)]
    ).double()


def test_shared_encoder_receives_pcgrad_update(ex):
    """train_step's shared gradient is PCGrad by hand (Yu et al. 2020, Alg. 1); heads: own."""
    model = _model(ex)
    batches = _batches(ex)
    shared = model.shared_parameters()
    # the same task orders as PCGrad(seed=0) draws at its first call
    order = gs.PCGrad(seed=0).orders(len(TASKS))

    # by hand: per-task gradients on the shared parameters, projected off conflicts
    ref = copy.deepcopy(model)
    ref_shared = ref.shared_parameters()
    losses = {t: ex.task_loss(ref, t, b) for t, b in batches.items()}
    g = [_flat_grads(losses[t], ref_shared) for t in TASKS]
    cos = torch.stack([torch.stack([a @ b / (a.norm() * b.norm()) for b in g]) for a in g])
    assert (cos < -0.05).any(), "the test needs a conflict between two tasks at this seed"
    update = torch.zeros_like(g[0])
    for i in range(len(TASKS)):
        gi = g[i].clone()
        for j in order[i].tolist():
            dot = gi @ g[j]
            if dot < 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        update += gi
    plain = sum(g)
    assert (update - plain).norm() > 1e-2 * plain.norm()  # the projection is active
    head_grads = {t: _flat_grads(losses[t], list(ref.heads[t].parameters())) for t in TASKS}

    # the example's step; lr = 0 keeps the weights, so .grad can be read after the step
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result = ex.train_step(model, batches, gs.PCGrad(seed=0), opt)
    got = torch.cat([p.grad.flatten() for p in shared]).double()
    torch.testing.assert_close(got, update, rtol=1e-4, atol=1e-6)
    for t in TASKS:
        head = torch.cat([p.grad.flatten() for p in model.heads[t].parameters()]).double()
        torch.testing.assert_close(head, head_grads[t], rtol=1e-4, atol=1e-7)
    assert result.tasks == TASKS
    torch.testing.assert_close(result.losses, torch.stack(list(losses.values())).detach())


def test_train_step_matches_direct_gs_backward_and_learns(ex):
    """A few PCGrad steps: identical to calling gs.backward directly; the losses fall."""
    model = _model(ex)
    twin = copy.deepcopy(model)
    batches = _batches(ex, n=16, seed=1)
    method, twin_method = gs.PCGrad(seed=0), gs.PCGrad(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=3e-3)
    before = [p.detach().clone() for p in model.shared_parameters()]
    history = []
    for _ in range(12):
        result = ex.train_step(model, batches, method, opt)
        history.append(result.losses)
        losses = {t: ex.task_loss(twin, t, b) for t, b in batches.items()}
        twin_opt.zero_grad()
        gs.backward(losses, shared=twin.shared_parameters(), method=twin_method)
        twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    moved = [not torch.equal(b, p) for b, p in zip(before, model.shared_parameters())]
    assert all(moved)  # every encoder tensor (embeddings, layers, pooler) was updated
    first, last = history[0], history[-1]
    assert (last < first).all(), (first, last)  # same batch 12 times: every loss falls


def test_single_task_step_is_the_plain_gradient(ex):
    """One task in the step (the single-task baseline): the shared gradient is dL/dtheta."""
    model = _model(ex)
    batch = _batches(ex)["sts"]
    ref = copy.deepcopy(model)
    loss = ex.task_loss(ref, "sts", batch)
    want = _flat_grads(loss, ref.shared_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ex.train_step(model, {"sts": batch}, gs.PCGrad(seed=0), opt)
    got = torch.cat([p.grad.flatten() for p in model.shared_parameters()]).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for t in ("sst", "para") for p in model.heads[t].parameters())


def test_bf16_autocast_step(ex):
    """The --bf16 path: losses under CPU autocast, a finite update of the encoder."""
    model = _model(ex)
    before = [p.detach().clone() for p in model.shared_parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    result = ex.train_step(model, _batches(ex), gs.PCGrad(seed=0), opt, autocast)
    assert torch.isfinite(result.losses).all()
    after = list(model.shared_parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, p) for b, p in zip(before, after))
    assert all(p.dtype == torch.float32 for p in after)


def test_famo_hooks_run_in_train_step(ex):
    """A stateful method: FAMO's after_step hook updates its logits inside train_step."""
    model = _model(ex)
    famo = gs.FAMO()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ex.train_step(model, _batches(ex), famo, opt)
    logits = famo.logits()
    assert set(logits) == set(TASKS)
    assert any(abs(v) > 0 for v in logits.values())  # xi moved: update() ran
    assert famo._prev is None  # the pending forward was consumed by the hook


def test_main_synthetic_both_modes(ex, capsys):
    args = ["--synthetic", "--mode", "both", "--epochs", "1", "--steps-per-epoch", "3"]
    results = ex.main([*args, "--synthetic-size", "32", "--batch-size", "8", "--device", "cpu"])
    assert set(results) == {"single-task", "PCGrad"}
    for run in results.values():
        assert set(run) == set(TASKS)
        assert 0.0 <= run["sst"] <= 1.0 and 0.0 <= run["para"] <= 1.0
        assert -1.0 <= run["sts"] <= 1.0 or run["sts"] != run["sts"]  # Pearson (NaN if flat)
    out = capsys.readouterr().out
    assert "delta-m" in out and "single-task sst" in out and "multi-task with PCGrad" in out


def _write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def cs224n_files(tmp_path):
    """Tiny files in the CS224N format (tab-separated, header), one malformed row each."""
    s = ["the movie is good", "a bad movie", "great", "awful awful", "it was good"]
    sst = [f"{i}\t{s[i % 5]}\t{i % 5}" for i in range(10)] + ["10\tbroken row\tnot-a-label"]
    para = [f"{i}\t{s[i % 5]}\t{s[(i + i % 2) % 5]}\t{float(i % 2 == 0)}" for i in range(10)]
    sts = [f"{i}\t{s[i % 5]}\t{s[(i + 1) % 5]}\t{i % 6}.0" for i in range(10)]
    files = {}
    for split in ("train", "dev"):
        files[f"sst-{split}"] = _write(
            tmp_path / f"ids-sst-{split}.csv", "id\tsentence\tsentiment", sst
        )
        files[f"para-{split}"] = _write(
            tmp_path / f"quora-{split}.csv",
            "id\tsentence1\tsentence2\tis_duplicate",
            [*para, "99\tonly one sentence"],
        )
        files[f"sts-{split}"] = _write(
            tmp_path / f"sts-{split}.csv", "id\tsentence1\tsentence2\tsimilarity", sts
        )
    return files


def test_loaders_read_the_cs224n_format(ex, cs224n_files, tmp_path):
    sst = ex.load_sst(cs224n_files["sst-train"])
    assert len(sst) == 10 and sst[1] == ("a bad movie", 1)  # the malformed row is skipped
    para = ex.load_pairs(cs224n_files["para-train"], "is_duplicate", lambda v: int(float(v)))
    assert len(para) == 10 and para[0] == ("the movie is good", "the movie is good", 1)
    sts = ex.load_pairs(cs224n_files["sts-train"], "similarity", float)
    assert sts[3][2] == 3.0
    empty = _write(tmp_path / "empty.csv", "id\tsentence\tsentiment", [])
    with pytest.raises(ValueError, match="no usable rows"):
        ex.load_sst(empty)


def _tiny_pretrained(directory: Path) -> None:
    """A tokenizer and a random BERT saved as a local "pretrained" model directory."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [
        "the",
        "a",
        "movie",
        "is",
        "good",
        "bad",
        "great",
        "awful",
        "it",
        "was",
        "only",
        "one",
        "sentence",
    ]
    params = inspect.signature(transformers.BertTokenizer.__init__).parameters
    if "vocab_file" in params:  # transformers 4.x: a vocabulary file
        vocab = directory / "vocab.txt"
        directory.mkdir(parents=True, exist_ok=True)
        vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
        tokenizer = transformers.BertTokenizer(vocab_file=str(vocab))
    else:  # 5.x: the vocabulary itself
        tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    assert tokenizer("the movie")["input_ids"] == [2, 5, 7, 3]
    config = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_main_on_files_with_a_local_model(ex, cs224n_files, tmp_path, capsys):
    """The real-data path end to end: CS224N files and a local model directory, offline."""
    model_dir = tmp_path / "tiny-bert"
    _tiny_pretrained(model_dir)
    args = ["--model", str(model_dir), "--mode", "multi", "--epochs", "1", "--device", "cpu"]
    args += ["--batch-size", "4", "--lr", "1e-3", "--max-length", "16"]
    for key, path in cs224n_files.items():
        args += [f"--{key}", str(path)]
    results = ex.main(args)
    assert set(results) == {"PCGrad"} and set(results["PCGrad"]) == set(TASKS)
    out = capsys.readouterr().out
    assert "sst 10, para 10, sts 10" in out and "3 steps per epoch" in out  # ceil(10 / 4)


def test_cli_errors(ex, cs224n_files):
    with pytest.raises(SystemExit):
        ex.main(["--sst-train", str(cs224n_files["sst-train"])])  # dev and other files missing
    with pytest.raises(SystemExit):
        ex.main(["--synthetic", "--tasks", "sst,nli"])
    with pytest.raises(SystemExit):
        ex.main(["--synthetic", "--method", "no-such-method"])
    with pytest.raises(ValueError, match="too small"):
        ex.synthetic_data(4, vocab_size=10)
