"""Triton tree-FFN kernels against a float64 PyTorch reference: outputs, paths and all gradients.

On a machine with a GPU the kernels are compiled; without one they run in Triton's interpreter
(TRITON_INTERPRET=1), which is slow, so the CPU shapes are small. Every check draws fresh random
inputs, and every kernel output buffer is poisoned with NaN first so an unwritten element fails.
"""

import os

import pytest
import torch

from treeffn import TreeFFN
from treeffn.bench.parity import ACTIVATIONS, reference_tree

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Without a GPU the kernels run in Triton's interpreter, which must be switched on before the
# process first imports Triton: tests/conftest.py does that, before collection.
INTERPRETED = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"

triton = pytest.importorskip("triton", reason="Triton is not installed (optional extra); kernel tests skipped")
if not CUDA and not INTERPRETED:  # pragma: no cover - only when this file runs without tests/conftest.py
    pytest.skip("no GPU and Triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it)",
                allow_module_level=True)

import treeffn.kernels.triton_common as tc  # noqa: E402
import treeffn.kernels.triton_tree as tt  # noqa: E402


def _probe():
    """Run one tiny kernel; some Triton/numpy pairs have a broken interpreter (triton 3.6 + numpy 2.4)."""
    try:
        x = torch.randn(3, 4, device=DEVICE, dtype=torch.float64)
        w = torch.randn(3, 4, device=DEVICE, dtype=torch.float64)
        tt.route(x, w, None, 1, 1, inference=True)
    except Exception as e:  # pragma: no cover - depends on the installed versions
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


_broken = _probe() if not CUDA else None
if _broken:  # pragma: no cover
    pytestmark = pytest.mark.skip(reason=f"Triton interpreter cannot run here ({_broken}); the GPU run covers this")


@pytest.fixture(autouse=True)
def _interpret_and_poison(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # conftest takes it out of the environment between tests

    def poisoned(*shape, dtype=None, device=None):
        t = torch.empty(*shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(tc, "_empty", poisoned)  # the output buffers of both kernel modules


ACTS = ACTIVATIONS
reference = reference_tree  # float64, through all pre-activations and a path mask: (y, path, z)


def make_params(d, depth, trees, bias, dtype=torch.float64, scale=1.0):
    total = trees * (2 ** (depth + 1) - 1)
    g = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE)  # noqa: E731
    w_in = (g(total, d) * scale / d**0.5).to(dtype)
    w_out = (g(total, d) / (trees * (depth + 1)) ** 0.5).to(dtype)
    b_in = (g(total) * 0.3).to(dtype) if bias else None
    return w_in, b_in, w_out


def run_both(x, params, trees, depth, placement, activation, wgrad, forced_path=False, mode="auto"):
    """Kernel and reference outputs and gradients (x, w_in, b_in, w_out) for one random dL/dy."""
    w_in, b_in, w_out = params
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w_in, b_in, w_out)]
    y, path = tt.tree_ffn_triton(leaves[0], leaves[1], leaves[2], leaves[3], trees, depth, placement,
                                 activation, wgrad=wgrad, mode=mode)
    g = torch.randn_like(y, dtype=torch.float64)
    (y.double() * g).sum().backward()
    ref_leaves = [t.detach().double().clone().requires_grad_(True) if t is not None else None
                  for t in (x, w_in, b_in, w_out)]
    y_ref, path_ref, z_ref = reference(*ref_leaves, trees, depth, placement, activation,
                                       path=path if forced_path else None)
    (y_ref * g).sum().backward()
    got = [y] + [t.grad if t is not None else None for t in leaves]
    want = [y_ref] + [t.grad if t is not None else None for t in ref_leaves]
    return got, want, path, path_ref, z_ref


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# Random shapes: (tokens, d, trees, depth); K=1, D=0, odd d, token counts off every tile size.
SHAPES = [(5, 7, 2, 3), (1, 9, 1, 0), (37, 12, 3, 2), (3, 16, 2, 5), (33, 5, 1, 4), (20, 11, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("placement", ["node", "post_sum"])
@pytest.mark.parametrize("mode", ["gather", "dense"])
def test_float64_matches_reference(shape, placement, mode):
    T, d, trees, depth = shape
    i = SHAPES.index(shape)
    activation = list(ACTS)[(i + (placement == "post_sum") * 3 + (mode == "dense")) % len(ACTS)]
    bias = (i + (mode == "dense")) % 2 == 0
    wgrad = "sparse" if (i + (placement == "node")) % 2 else "dense"  # gather mode's two weight-grad forms
    params = make_params(d, depth, trees, bias)
    x = torch.randn(T, d, dtype=torch.float64, device=DEVICE)
    got, want, path, path_ref, _ = run_both(x, params, trees, depth, placement, activation, wgrad, mode=mode)
    assert torch.equal(path.cpu(), path_ref.cpu())
    for name, a, b in zip(("y", "x", "w_in", "b_in", "w_out"), got, want):
        if b is None:
            assert a is None
            continue
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["gather", "dense"])
def test_off_path_nodes_get_exactly_zero_gradient(mode):
    T, d, trees, depth = 4, 6, 2, 3
    params = make_params(d, depth, trees, True)
    x = torch.randn(T, d, dtype=torch.float64, device=DEVICE)
    got, _, path, _, _ = run_both(x, params, trees, depth, "node", "gelu", "sparse", mode=mode)
    n_nodes = 2 ** (depth + 1) - 1
    visited = set((path + torch.arange(trees, device=path.device).view(1, -1, 1) * n_nodes).flatten().tolist())
    off = [r for r in range(trees * n_nodes) if r not in visited]
    assert off
    for grad in got[2:]:
        assert grad[off].abs().max() == 0


@pytest.mark.parametrize("tokens, mode", [(1, "auto"), (4, "auto"), (9, "gather"), (40, "gather"), (530, "gather")])
@pytest.mark.parametrize("placement", ["node", "post_sum"])
def test_inference_tile_configs(tokens, mode, placement):
    """Every tile regime of the inference kernels: decode speculation, single-token tiles, big tiles."""
    trees, depth, d = (2, 5, 10) if tokens < 100 else (1, 4, 6)
    w_in, b_in, w_out = make_params(d, depth, trees, True)
    x = torch.randn(tokens, d, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        y, path = tt.tree_ffn_triton(x, w_in, b_in, w_out, trees, depth, placement, "gelu", mode=mode)
    y_ref, path_ref, _ = reference(x, w_in, b_in, w_out, trees, depth, placement, "gelu")
    assert torch.equal(path, path_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


def assert_routing_agrees(path, z64, trees, depth, tie):
    """Every decision on the kernel's path agrees with float64 z unless |z| is within ``tie``."""
    T = path.shape[0]
    n_nodes = 2 ** (depth + 1) - 1
    zz = z64.view(T, trees, n_nodes)
    zp = torch.gather(zz, 2, path[:, :, :-1])
    went_right = (path[:, :, 1:] - 2 * path[:, :, :-1] - 1) == 1
    wrong = went_right != (zp > 0)
    assert (zp[wrong].abs() <= tie).all(), f"{int(wrong.sum())} routing decisions differ beyond ties"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_within_dtype_tolerance(dtype, tol):
    T, d, trees, depth = (300, 256, 8, 6) if CUDA else (13, 24, 2, 4)
    params = make_params(d, depth, trees, True, dtype=dtype)
    x = torch.randn(T, d, device=DEVICE).to(dtype)
    for placement, mode in (("node", "gather"), ("post_sum", "gather"), ("node", "dense")):
        got, want, path, _, z64 = run_both(x, params, trees, depth, placement, "gelu", "auto", forced_path=True,
                                           mode=mode)
        assert_routing_agrees(path, z64.detach(), trees, depth, tie=1e-3 if dtype == torch.bfloat16 else 1e-5)
        for name, a, b in zip(("y", "x", "w_in", "b_in", "w_out"), got, want):
            assert a.dtype == dtype, name
            assert rel_err(a, b) < tol, f"{placement} {mode} {name}: rel err {rel_err(a, b):.2e}"


@pytest.mark.skipif(not CUDA, reason="needs many concurrent programs: a compiled GPU run")
def test_dense_mode_in_place_kernels_have_no_race():
    """The dense-mode kernels overwrite their input block in place; at large batch sizes a
    missing barrier showed up as a few wrong dL/dz values (seen in the bias gradient)."""
    T, d, trees, depth = 4096, 256, 16, 6
    for _ in range(3):
        params = make_params(d, depth, trees, True, dtype=torch.float32)
        x = torch.randn(T, d, device=DEVICE)
        got, want, *_ = run_both(x, params, trees, depth, "node", "gelu", "auto", forced_path=True, mode="dense")
        for name, a, b in zip(("y", "x", "w_in", "b_in", "w_out"), got, want):
            assert rel_err(a, b) < 1e-4, f"{name}: rel err {rel_err(a, b):.2e}"


def test_ties_go_left():
    w_in = torch.zeros(7, 4, dtype=torch.float64, device=DEVICE)  # every z is exactly 0
    w_out = torch.randn(7, 4, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        _, path = tt.tree_ffn_triton(torch.randn(3, 4, dtype=torch.float64, device=DEVICE), w_in, None, w_out, 1, 2)
    assert path.tolist() == [[[0, 1, 3]]] * 3


def test_layer_dispatch_uses_triton(monkeypatch):
    """TreeFFN(impl="triton") in both modes agrees with the masked path and counts visits."""
    layer = TreeFFN(8, 3, 2, placement="post_sum", impl="triton").double().to(DEVICE)
    with torch.no_grad():
        layer.w_in.normal_()
        layer.b_in.normal_()
    x = torch.randn(2, 5, 8, dtype=torch.float64, device=DEVICE)
    calls = []
    real = tt.tree_ffn_triton
    monkeypatch.setattr(tt, "tree_ffn_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        layer.node_visits.zero_()
        y = layer(x)
        y_ref, path_ref = layer.forward_masked(x.reshape(-1, 8))
        torch.testing.assert_close(y.reshape(-1, 8), y_ref, rtol=1e-10, atol=1e-10)
        assert layer.node_visits.sum().item() == 10 * 2 * 4
    assert len(calls) == 2


def test_rejects_bad_arguments():
    w = torch.randn(7, 4, dtype=torch.float64, device=DEVICE)
    x = torch.randn(2, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="placement"):
        tt.tree_ffn_triton(x, w, None, w, 1, 2, placement="middle")
    with pytest.raises(ValueError, match="rows"):
        tt.tree_ffn_triton(x, w, None, w, 2, 2)
    with pytest.raises(ValueError, match="wgrad"):
        tt.tree_ffn_triton(x, w, None, w, 1, 2, wgrad="atomic")
    with pytest.raises(ValueError, match="mode"):
        tt.tree_ffn_triton(x, w, None, w, 1, 2, mode="sparse")


@pytest.mark.skipif(not CUDA, reason="autocast dtype handling is a CUDA feature")
def test_autocast_bf16_on_gpu():
    layer = TreeFFN(64, 4, 3, impl="triton").cuda()
    x = torch.randn(50, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.w_in.grad is not None and layer.w_in.grad.dtype == torch.float32


def test_auto_impl_by_device_and_batch(monkeypatch):
    import treeffn.kernels as kernels

    x = torch.zeros(5, 4)
    assert kernels.auto_impl(x, training=True) == "masked"
    assert kernels.auto_impl(x, training=False) == "gather"
    threads = torch.get_num_threads()
    try:
        for n, limit in ((2, kernels.AUTO_GATHER_MAX_TOKENS_CPU), (1, kernels.AUTO_GATHER_MAX_TOKENS_CPU_ONE_THREAD)):
            torch.set_num_threads(n)
            assert kernels.auto_impl(torch.zeros(limit, 4), training=False) == "gather"
            assert kernels.auto_impl(torch.zeros(limit + 1, 4), training=False) == "masked"  # measured crossover
    finally:
        torch.set_num_threads(threads)

    class FakeCuda:  # only .is_cuda and .shape are read
        is_cuda = True

        def __init__(self, tokens):
            self.shape = (tokens, 4)

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert kernels.auto_impl(FakeCuda(kernels.AUTO_TRITON_MAX_TOKENS), training=True) == "triton"
    assert kernels.auto_impl(FakeCuda(kernels.AUTO_TRITON_MAX_TOKENS + 1), training=False) == "masked"
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels.auto_impl(FakeCuda(1), training=False) == "masked"


def test_bench_smoke_on_cpu(tmp_path, capsys):
    """`treeffn bench` end to end at a toy size: checks pass, both timings per call, JSON and Markdown written."""
    import json

    from treeffn.cli.bench import main

    rc = main(["device=cpu", "configs=[custom:16,64,2,2]", "tokens=[3]", "paths=[dense,masked,gather]",
               "rep_ms=1", f"out={tmp_path}"])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    timed = [r for r in result["rows"] if "loop_us" in r]
    assert {(r["path"], r["mode"]) for r in timed} >= {("dense", "fwd"), ("masked", "fwdbwd"), ("gather", "fwd")}
    assert all(r["check"]["ok"] and r["gpu_us"] > 0 and r["loop_us"] > 0 for r in timed)
    assert all(len(r["loop_us_rounds"]) == 5 and r["loop_weight_copies"] >= 2 for r in timed)
    assert all("speedup_vs_dense" in r and "gpu_only_speedup_vs_dense" in r for r in timed if r["path"] != "dense")
    assert result["environment"]["load_average_1_5_15"] is not None
    md = (tmp_path / "bench.md").read_text()
    assert "| custom:16,64,2,2 | 3 |" in md and "loop µs per call, host included" in md and "GPU-only" in md
    assert "custom:16,64,2,2" in capsys.readouterr().out
    assert main(["device=cpu", "modes=[backward]", f"out={tmp_path}"]) == 2


def test_bench_tune_measures_candidates_and_keeps_the_fixed_tiles(tmp_path, monkeypatch):
    """`treeffn bench mode=tune`: each candidate tile is passed to its launcher for one call,
    checked against the fixed tile's output and timed; the kernels' fixed tiles are unchanged."""
    import json

    import treeffn.bench.tune as tune
    import treeffn.kernels.triton_decode as td
    from treeffn.cli.bench import main

    class OneCall:  # the interpreter is too slow for real timing; each candidate runs once more
        def __init__(self, *a, **k):
            pass

        def gpu(self, fn):
            fn()
            return {"gpu_us": 1.0, "host_enqueue_us": 0.0}

    monkeypatch.setattr(tune, "Timer", OneCall)
    monkeypatch.setattr(tune, "TUNE_SPACE", {"route": [dict(SPEC=1, BT=1, BD=8)], "combine": [dict(BT=1, BE=4, BD=8)],
                                             "gcoef": [dict(BT=1, BD=8)]})
    monkeypatch.setattr(tune, "DECODE_SPACE", [dict(KB=2, SPEC=3, BD=8, num_warps=4)])
    fixed = td.decode_config(2, 16, 2, 3)
    assert main(["device=cpu", "mode=tune", "configs=[custom:16,64,2,2]", "tokens=[2]", f"out={tmp_path}"]) == 0
    records = json.loads((tmp_path / "tune.json").read_text())["tune"]
    assert {r["kernel"] for r in records} == {"route", "combine", "gcoef", "decode"}
    assert all(r["ok"] and "error" not in r for r in records), records
    assert [r["fixed"] for r in records if r["kernel"] == "decode"] == [fixed]
    assert td.decode_config(2, 16, 2, 3) == fixed


def test_loss_curve_model_forces_a_triton_mode_without_touching_module_state():
    """The loss curve's forced-gather run calls tree_ffn_triton in mode gather: the same loss and
    gradients as the masked path, and the kernels' auto crossover is left as it was."""
    from treeffn.bench.loss_curve import TinyTreeLM

    before = tt.GATHER_MAX_TOKENS
    ids = torch.randint(0, 40, (2, 9))
    losses, grads = {}, {}
    for impl, mode in (("masked", "auto"), ("triton", "gather")):
        torch.manual_seed(0)
        model = TinyTreeLM(40, d=16, layers=1, heads=2, depth=2, trees=2, placement="node", impl=impl,
                           triton_mode=mode).double()
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses[impl], grads[impl] = loss.item(), model.blocks[0]["ffn"].w_in.grad
    assert losses["triton"] == pytest.approx(losses["masked"], rel=1e-9)
    torch.testing.assert_close(grads["triton"], grads["masked"], rtol=1e-9, atol=1e-12)
    assert tt.GATHER_MAX_TOKENS == before


@pytest.mark.parametrize("argv, message", [
    (["tokens=[0]"], "tokens: 0 is out of range"),
    (["tokens=[1,x]"], "tokens takes integers"),
    (["configs=[custom:7,13,1,99]"], "depth D must be 0..20"),
    (["configs=[custom:7,13]"], "four integers"),
    (["configs=[custom:2048,8192,64,20]"], "too large to build"),
    (["configs=[opt9b]"], "unknown config"),
    (["paths=[fast]"], "paths='fast' is not allowed"),
    (["rep_ms=-1"], "rep_ms=-1 is not allowed"),
    (["mode=decode", "decode.model=gpt5"], "decode.model='gpt5'"),
    (["mode=decode", "decode.batches=[0]"], "decode.batches: 0 is out of range"),
    (["placement=middle"], "placement='middle' is not allowed"),
    (["tokens=1,16"], "give a list (tokens=[1,16])"),
    (["--tokens", "3"], "did you mean tokens=3?"),
    (["--decode"], "did you mean mode=decode?"),
    (["decode.modle=tiny"], "did you mean decode.model"),
])
def test_bench_refuses_bad_input_in_one_line(argv, message, tmp_path, capsys):
    from treeffn.cli.bench import main

    assert main(["device=cpu", *argv, f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert err.startswith("treeffn bench: error: ") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_bench_configs_mix_presets_and_custom():
    from treeffn.bench.problems import split_configs

    assert split_configs("opt125m-K24-D6,custom:16,64,2,2,opt1.3b-K64-D6") == [
        "opt125m-K24-D6", "custom:16,64,2,2", "opt1.3b-K64-D6"]


# --------------------------------------------------------------------------- the one-launch decode kernel
def decode_reference(x, w_in, b_in, w_out, trees, depth, placement, activation, w_up=None):
    y, path, _ = reference_tree(x, w_in, b_in, w_out, trees, depth, placement, activation, w_up)
    return y, path


# (tokens, d, trees, depth, tile): K=1, D=0, odd d, trees not a multiple of KB, 64 tokens (the top of the range)
DECODE_CASES = [
    (1, 9, 3, 3, dict(KB=1, SPEC=2, BD=8)), (5, 16, 2, 5, dict(KB=2, SPEC=3, BD=16)),
    (3, 7, 5, 0, dict(KB=4, SPEC=1, BD=4)), (4, 33, 1, 6, dict(KB=1, SPEC=3, BD=8)),
    (2, 12, 3, 4, dict(KB=2, SPEC=2, BD=32)), (64, 10, 2, 2, dict(KB=2)),
]


@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
@pytest.mark.parametrize("placement", ["node", "post_sum"])
@pytest.mark.parametrize("gated", [False, True])
def test_decode_kernel_float64_matches_reference(case, placement, gated):
    """Fresh random inputs: outputs within 1e-9 and every routing decision equal to float64's."""
    import treeffn.kernels.triton_decode as td

    T, d, trees, depth, tile = DECODE_CASES[case]
    if T > 8 and (gated or placement != "node"):
        pytest.skip("64 tokens once (the interpreter runs every program in turn)")
    activation = list(ACTS)[(case + 2 * gated + (placement == "post_sum")) % len(ACTS)]
    bias = (case + gated) % 2 == 0
    w_in, b_in, w_out = make_params(d, depth, trees, bias)
    w_up = make_params(d, depth, trees, False)[0] if gated else None
    x = torch.randn(T, d, dtype=torch.float64, device=DEVICE)
    y, path = td.tree_decode(x, w_in, b_in, w_out, trees, depth, placement, activation, w_up=w_up, tile=tile)
    y_ref, path_ref = decode_reference(x, w_in, b_in, w_out, trees, depth, placement, activation, w_up)
    assert torch.equal(path, path_ref)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)


def test_decode_kernel_leaves_its_workspace_zero_and_repeats_exactly():
    """The last program of each token resets the accumulator row and the counter: a second call
    (a graph replay) starts clean and gives the same result."""
    import treeffn.kernels.triton_decode as td

    tile = dict(KB=2, SPEC=2, BD=8)
    w_in, b_in, w_out = make_params(10, 3, 5, True)
    x = torch.randn(6, 10, dtype=torch.float64, device=DEVICE)
    first = td.tree_decode(x, w_in, b_in, w_out, 5, 3, "post_sum", "gelu", tile=tile)
    acc, cnt = td.workspace(x.device, torch.float64, 10, 6)
    assert acc.abs().max() == 0 and cnt.abs().max() == 0
    second = td.tree_decode(x, w_in, b_in, w_out, 5, 3, "post_sum", "gelu", tile=tile)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_kernel_low_precision(dtype, tol):
    """fp32 / bf16 inputs: fp32 accumulation; routing checked decision by decision (flips only at ties)."""
    import treeffn.kernels.triton_decode as td

    T, d, trees, depth = (64, 256, 8, 6) if CUDA else (7, 24, 3, 4)
    for placement in ("node", "post_sum"):
        w_in, b_in, w_out = make_params(d, depth, trees, True, dtype=dtype)
        x = torch.randn(T, d, device=DEVICE).to(dtype)
        y, path = td.tree_decode(x, w_in, b_in, w_out, trees, depth, placement, "gelu")
        assert y.dtype == dtype
        y64, _, z64 = reference(x.double(), w_in.double(), b_in.double(), w_out.double(), trees, depth, placement,
                                "gelu", path=path)
        assert_routing_agrees(path, z64, trees, depth, tie=1e-3 if dtype == torch.bfloat16 else 1e-5)
        assert rel_err(y, y64) < tol, f"{placement}: rel err {rel_err(y, y64):.2e}"


def test_decode_ties_go_left():
    import treeffn.kernels.triton_decode as td

    w_in = torch.zeros(7, 4, dtype=torch.float64, device=DEVICE)  # every z is exactly 0
    w_out = torch.randn(7, 4, dtype=torch.float64, device=DEVICE)
    _, path = td.tree_decode(torch.randn(3, 4, dtype=torch.float64, device=DEVICE), w_in, None, w_out, 1, 2)
    assert path.tolist() == [[[0, 1, 3]]] * 3


def test_auto_mode_decodes_at_inference_only(monkeypatch):
    """mode auto: the decode kernel for inference up to DECODE_MAX_TOKENS; training keeps the autograd kernels."""
    import treeffn.kernels.triton_decode as td

    calls = []
    real = td.tree_decode
    monkeypatch.setattr(td, "tree_decode", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    w_in, b_in, w_out = make_params(6, 2, 2, True)
    with torch.no_grad():
        tt.tree_ffn_triton(torch.randn(3, 6, dtype=torch.float64, device=DEVICE), w_in, b_in, w_out, 2, 2)
        tt.tree_ffn_triton(torch.randn(td.DECODE_MAX_TOKENS + 1, 6, dtype=torch.float64, device=DEVICE),
                           w_in, b_in, w_out, 2, 2)
    x = torch.randn(3, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    tt.tree_ffn_triton(x, w_in, b_in, w_out, 2, 2)[0].sum().backward()
    assert calls == [3]
    with pytest.raises(ValueError, match="inference only"):
        tt.tree_ffn_triton(x, w_in, b_in, w_out, 2, 2, mode="decode")


def test_decode_path_is_capture_safe():
    """A tree layer at inference on the decode kernel (interpreter here) never waits for the device."""
    from treeffn.generation.capture import HostSyncGuard

    layer = TreeFFN(8, 3, 3, placement="post_sum", impl="triton").double().to(DEVICE).eval()
    x = torch.randn(2, 1, 8, dtype=torch.float64, device=DEVICE)
    with torch.no_grad(), HostSyncGuard():
        y = layer(x)
    y_ref, _ = layer.forward_masked(x.reshape(-1, 8))
    torch.testing.assert_close(y.reshape(-1, 8), y_ref, rtol=1e-10, atol=1e-10)
    assert layer.node_visits.sum().item() == 2 * 3 * 4  # counted without a host sync (index_add_)
