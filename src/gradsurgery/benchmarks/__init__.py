"""Named multi-task problems: data + default model + task specs, looked up by name.

Every benchmark loads offline: real data sets are read from files that ship inside installed
packages (or a Debian data package), synthetic ones are generated from the seed. A missing
package raises :class:`MissingDataError` naming the command that installs it. Importing this
package imports none of the data packages.
"""

from __future__ import annotations

from gradsurgery.benchmarks import (
    adult,
    gradnorm_toy,
    mmoe_synthetic,
    multifashion,
    multimnist,
    yeast,
)
from gradsurgery.benchmarks._base import Benchmark, MissingDataError, Splits

__all__ = ["BENCHMARKS", "Benchmark", "MissingDataError", "Splits", "get_benchmark"]

#: name -> benchmark, in the order ``gradsurgery list`` shows them
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        multimnist.BENCHMARK,
        multifashion.BENCHMARK,
        yeast.BENCHMARK,
        adult.BENCHMARK,
        mmoe_synthetic.BENCHMARK,
        gradnorm_toy.BENCHMARK,
        # toy2d.BENCHMARK is added here by the lead (benchmarks/toy2d.py, another helper's)
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    try:
        return BENCHMARKS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown benchmark {name!r}; valid: {', '.join(sorted(BENCHMARKS))}"
        ) from None
