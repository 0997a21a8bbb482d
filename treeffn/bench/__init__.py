"""``treeffn bench``: speed of the tree FFN against a dense MLP, every path checked first.

Modules, in the order a run uses them:

* ``cli``        conf/bench.yaml's settings, their one-line checks, dispatch to a mode
                 (the command line itself is cli/bench.py, as for every verb);
* ``problems``   presets, the paths under test, their float64 checks (outputs and routing);
* ``timing``     the two figures per call: host-inclusive loop time (the headline) and GPU-only
                 time (a diagnostic), the machine's ceilings, the run's environment;
* ``layer``      the layer benchmark (default mode): bench.json;
* ``report``     its Markdown tables: bench.md;
* ``decode``     ``mode=decode``: tokens/s of whole models through treeffn's decode loop, eager and
                 CUDA-graphed, and a per-kernel profile of one decode step: decode.json;
* ``tune``       ``mode=tune``: tile candidates of the Triton kernels timed against their fixed
                 tiles (a measurement; nothing here changes the tiles the kernels run): tune.json;
* ``loss_curve`` ``mode=loss_curve``: masked vs Triton training of a small LM, same seed.
"""

from treeffn.bench.cli import bench_args, run_bench

__all__ = ["bench_args", "run_bench"]
