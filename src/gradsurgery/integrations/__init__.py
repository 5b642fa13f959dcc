"""Optional integrations with other training frameworks.

Nothing here is imported by ``import gradsurgery``: each integration imports its framework
when it is itself imported, and says which extra to install when the framework is missing.

* :mod:`gradsurgery.integrations.lightning`: :class:`MultiTaskModule`, a Lightning
  ``LightningModule`` that trains with :func:`gradsurgery.backward` (manual optimisation).
  Needs ``pip install 'gradsurgery[lightning]'``.

Hugging Face ``transformers`` needs no adapter: its encoders are ordinary ``nn.Module`` s, so
``gs.backward`` takes their parameters as ``shared`` directly (``examples/hf_multitask.py``).
"""

from __future__ import annotations

__all__: list[str] = []
