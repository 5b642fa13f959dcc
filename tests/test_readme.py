"""The README's training-loop example runs as written (with a tiny in-memory loader)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_training_loop_example_runs():
    text = README.read_text()
    section = text[text.index("## Use it in your training loop") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    loader = []
    for _ in range(3):
        x = torch.randn(8, 64, generator=g)
        digit = torch.randint(0, 10, (8,), generator=g)
        loader.append((x, {"digit": digit, "parity": digit % 2}))
    scope = {"loader": loader}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.weights is not None and result.weights.shape == (2,)
    assert result.cosines.shape == (2, 2)
