"""``graphopt bench``: graphopt against eager PyTorch, torch.compile and ONNX Runtime, side by side.

All modes of a model run in one process on the same inputs: warm-up first, then the median of
many timed calls over rotating random inputs (never zeros). On the CPU the thread count is fixed;
on the GPU timings come from ``triton.testing.do_bench``. Every mode's outputs are compared with
eager fp32 (max abs, relative L2, cosine). A mode that cannot run is reported with its reason.
The default sweep is quick (the zoo's small models, five modes, about 3 minutes on 2 cores);
``--full`` is the sweep docs/benchmarks.md records.

One module per concern, each importing only those listed before it: ``mode`` (what a mode is),
``inputs``, ``timing``, ``onnx_modes`` and ``modes`` (the modes by name, graphopt's on each
backend), ``measure`` (one model, every mode), ``scaling``, ``environment``, ``tables``,
``targets`` (issue 15's targets, judged), ``progress`` (the steps shown while it runs), ``report`` (json and markdown), ``plots``, ``page`` (the
docs page), ``kernels`` (kernel microbenchmarks) and ``command`` (the options and the run). Models
are the zoo's (``graphopt.zoo``), selected by name. ``tools/gpu_check.sh`` runs the GPU-marked
tests and a GPU run of this benchmark in one bounded step each.
"""

from graphopt.tools.bench.command import add_arguments, run

__all__ = ["add_arguments", "run"]
