"""`python -m normkit bench`: its arguments, byte model and targets, that each other library's twin
computes exactly what normkit computes (so the timings compare the same work), and the shape of
what a run prints and writes. Nothing here asserts on a timing."""
import argparse
import json
import sys

import numpy as np
import pytest

import normkit
from normkit import _bench, _bench_onnx
from normkit.__main__ import main

F32 = np.dtype(np.float32)
BIG, BN_SHAPE = _bench.BIG_SHAPE, _bench.BN_TARGET_SHAPE
SMALL = {"conv": (2, 64, 5, 6), "row": (6, 32)}  # 64 channels: GroupNorm's 32 groups of 2


def parse(argv):
    parser = argparse.ArgumentParser()
    _bench.add_arguments(parser)
    return parser.parse_args(argv)


def small_shape(op):
    return SMALL[_bench.OPS[op][1]]


def randomized(layer, seed=1):
    """The layer with non-trivial parameters and running statistics, so a twin that ignored
    them would not match."""
    rng = np.random.default_rng(seed)
    for a in layer.parameters().values():
        a[...] = rng.uniform(0.5, 1.5, a.shape)
    if getattr(layer, "running_mean", None) is not None:
        layer.running_mean[...] = rng.standard_normal(layer.running_mean.shape)
        layer.running_var[...] = rng.uniform(0.5, 1.5, layer.running_var.shape)
    return layer


def close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


# -- arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--ops", "bn,xx"], ["--ops", ","], ["--layouts", "NCWH"],
                                  ["--layouts", ""], ["--dtypes", "float8"], ["--threads", "0"],
                                  ["--threads", "two"], ["--shapes", "huge"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench"] + argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_defaults_cover_every_target_and_quick_is_small():
    layouts, dtypes, preset, skipped = _bench.plan(parse([]))
    assert layouts == ["NCHW", "NHWC"] and dtypes == [F32] and preset == "all" and not skipped
    assert BIG in _bench.SHAPES["all"][0] and BN_SHAPE in _bench.SHAPES["all"][0]
    assert _bench.plan(parse(["--quick"]))[:3] == (["NCHW"], [F32], "standard")
    assert BIG not in _bench.SHAPES["standard"][0]
    explicit = parse(["--quick", "--layouts", "NHWC,NCHW,NHWC", "--shapes", "all", "--dtype", "float64"])
    assert _bench.plan(explicit)[:3] == (["NHWC", "NCHW"], [np.dtype(np.float64)], "all")


def test_row_ops_have_no_nhwc_table():
    got = [(op, layout) for _, op, layout, _ in _bench.cases(["bn", "ln", "rms", "gn", "in"],
                                                            ["NCHW", "NHWC"], [F32], "tiny")]
    assert got == [("bn", "NCHW"), ("bn", "NHWC"), ("ln", "NCHW"), ("rms", "NCHW"),
                   ("gn", "NCHW"), ("gn", "NHWC"), ("in", "NCHW"), ("in", "NHWC")]
    assert main(["bench", "--ops", "ln,rms", "--layouts", "NHWC"]) == 2


def test_inputs_are_stored_in_the_layout():
    x, dy = _bench.inputs((2, 3, 4, 5), F32, "NCHW")
    xt, _ = _bench.inputs((2, 3, 4, 5), np.float16, "NHWC")
    assert x.shape == dy.shape == (2, 3, 4, 5) and x.dtype == F32 and not np.array_equal(x, dy)
    assert xt.shape == (2, 4, 5, 3) and xt.dtype == np.float16 and xt.flags.c_contiguous


# -- byte model, speedup, targets ----------------------------------------------------------------
def test_byte_model_and_roofline():
    assert _bench.BYTE_MODEL == {"fwd": 2, "bwd": 3, "fwd+bwd": 5, "infer": 2}
    row = _bench.make_row("bn", (2, 16, 8, 8), "NCHW", F32, "bwd",
                          {"normkit": 1e-3, "torch": None, "ort": None}, 8192, 50e9, 2)
    assert row["bytes"] == 3 * 8192
    assert row["normkit_gbps"] == pytest.approx(3 * 8192 / 1e-3 / 1e9)
    assert row["roof_fraction"] == pytest.approx(3 * 8192 / 1e-3 / 50e9)
    assert row["best"] is None and row["speedup"] is None and row["torch_speedup"] is None


def test_speedup_is_against_the_fastest_other_library():
    row = _bench.make_row("bn", (2, 16, 8, 8), "NCHW", F32, "infer",
                          {"normkit": 1e-3, "torch": 2e-3, "ort": 1.5e-3}, 8192, 50e9, 2)
    assert row["best"] == "ort" and row["speedup"] == pytest.approx(1.5)
    assert row["torch_speedup"] == pytest.approx(2.0)
    assert row["targets"] == [{"metric": "speedup", "threshold": 1.2}] and row["target_met"] is True
    row = _bench.make_row("bn", (2, 16, 8, 8), "NCHW", F32, "infer",
                          {"normkit": 1e-3, "torch": 1.1e-3, "ort": 5e-3}, 8192, 50e9, 2)
    assert row["best"] == "torch" and row["target_met"] is False


@pytest.mark.parametrize("op, shape, layout, dtype, mode, threads, want", [
    ("bn", BN_SHAPE, "NCHW", "float32", "fwd+bwd", 2, [("torch_speedup", 4.0)]),
    ("bn", BN_SHAPE, "NHWC", "float32", "fwd+bwd", 2, [("torch_speedup", 2.0)]),
    ("gn", BN_SHAPE, "NCHW", "float32", "fwd+bwd", 2, [("torch_speedup", 2.0)]),
    ("rms", (8192, 1024), "NCHW", "float32", "fwd+bwd", 2, [("torch_speedup", 2.0)]),
    ("bn", BN_SHAPE, "NCHW", "float32", "fwd", 2, []),
    ("ln", (8192, 1024), "NCHW", "float32", "bwd", 2, []),
    ("ln", (8192, 1024), "NCHW", "float32", "infer", 2, [("speedup", 1.2)]),
    ("bn", BIG, "NCHW", "float32", "fwd", 2, [("roof_fraction", 0.8)]),
    ("in", BIG, "NHWC", "float32", "infer", 2, [("speedup", 1.2), ("roof_fraction", 0.8)]),
    ("gn", BIG, "NCHW", "float32", "bwd", 2, [("roof_fraction", 0.7)]),
    ("bn", BIG, "NCHW", "float32", "fwd+bwd", 2, [("torch_speedup", 2.0)]),
    ("bn", BN_SHAPE, "NCHW", "float64", "fwd+bwd", 2, []),
    ("bn", BIG, "NCHW", "float16", "fwd", 2, []),
    ("bn", BN_SHAPE, "NCHW", "float32", "fwd", 1, [("torch_speedup", 1.0)]),
    ("bn", BIG, "NCHW", "float32", "infer", 1, [("torch_speedup", 1.0)]),
])
def test_targets_follow_the_issue(op, shape, layout, dtype, mode, threads, want):
    assert _bench.row_targets(op, shape, layout, dtype, mode, threads) == want


def test_target_met():
    targets = [("speedup", 1.2), ("roof_fraction", 0.8)]
    assert _bench.target_met({"speedup": 1.2, "roof_fraction": 0.8}, targets) is True
    assert _bench.target_met({"speedup": 1.19, "roof_fraction": 0.9}, targets) is False
    assert _bench.target_met({"speedup": 2.0, "roof_fraction": 0.79}, targets) is False
    assert _bench.target_met({"speedup": None, "roof_fraction": 0.9}, targets) is None
    assert _bench.target_met({"speedup": 2.0}, []) is None
    assert _bench.target_text(targets) == "1.2x best, 80% roof" and _bench.target_text([]) == "-"


def test_summary_lists_each_miss():
    rows = [_bench.make_row("gn", BIG, "NCHW", F32, mode, {"normkit": t, "torch": 1.0, "ort": None},
                            1000, 1e6, 2) for mode, t in (("fwd", 2e-3), ("bwd", 3e-3), ("fwd+bwd", 1.0))]
    overhead = [{"layer": "LayerNorm", "normkit_us": 2.5, "target_us": 3.0, "target_met": True},
                {"layer": "RMSNorm", "normkit_us": 4.0, "target_us": 3.0, "target_met": False}]
    s = _bench.summarize(rows, overhead)
    assert (s["rows_with_targets"], s["met"], s["not_evaluated"]) == (5, 3, 0)
    assert len(s["misses"]) == 2
    assert "fwd+bwd" in s["misses"][0] and "1.00x torch (target 2x torch)" in s["misses"][0]
    assert "RMSNorm" in s["misses"][1]
    assert _bench.summary_lines(s)[0] == "targets: 3 of 5 met"


def test_a_library_that_cannot_run_a_case_gives_n_a():
    notes = []

    def no_kernel():
        raise NotImplementedError("no kernel for Half\nmore")

    assert _bench.attempt(no_kernel, "torch", "bwd", notes) is None
    assert notes == ["torch bwd: n/a (NotImplementedError: no kernel for Half)"]


# -- the twins compute what normkit computes ------------------------------------------------------
def torch_twin_cases():
    return [(op, layout) for op, spec in _bench.OPS.items()
            for layout in (("NCHW", "NHWC") if spec[1] == "conv" else ("NCHW",))]


@pytest.mark.parametrize("op, layout", torch_twin_cases())
def test_torch_twin_matches_normkit(op, layout):
    torch = pytest.importorskip("torch")
    _bench.import_torch()
    shape = small_shape(op)
    x, dy = _bench.inputs(shape, F32, layout, seed=3)
    x += 2.0  # an offset: a twin that skipped the mean would differ
    layer = randomized(_bench.normkit_layer(op, shape, F32, layout))
    module = _bench.torch_module(op, shape, F32, layout)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    tx, tdy = _bench.to_torch(x, layout), _bench.to_torch(dy, layout)
    assert tuple(tx.shape) == shape and tx.data_ptr() == x.ctypes.data  # the same memory, no copy
    if layout == "NHWC":
        assert tx.is_contiguous(memory_format=torch.channels_last)

    def back(t):  # torch's NCHW-shaped result in the layout normkit returns
        t = t.detach()
        return (t.permute(0, *range(2, t.ndim), 1) if layout == "NHWC" else t).numpy()

    gx = tx.detach().clone().requires_grad_(True)
    ty = module.train()(gx)
    close(back(ty), layer.train()(x), "training forward")
    (tdx,) = torch.autograd.grad(ty, gx, tdy)
    close(back(tdx), layer.backward(dy), "backward")
    with torch.inference_mode():
        close(back(module.eval()(tx)), layer.eval()(x), "inference")


def test_bfloat16_reaches_torch_bit_for_bit():
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    _bench.import_torch()
    x, _ = _bench.inputs((2, 3, 4, 5), np.dtype(ml_dtypes.bfloat16), "NHWC")
    t = _bench.to_torch(x, "NHWC")
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == (2, 3, 4, 5)  # logical NCHW
    assert np.array_equal(t.permute(0, 2, 3, 1).float().numpy(), x.astype(np.float32))


@pytest.mark.parametrize("op", list(_bench_onnx.GRAPHS))
def test_every_onnx_runtime_twin_matches_normkit_inference(op):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    assert _bench_onnx.import_onnx()
    shape = small_shape(op)
    x, _ = _bench.inputs(shape, F32, seed=4)
    x += 2.0
    layer = randomized(_bench.normkit_layer(op, shape, F32)).eval()
    want = layer(x)
    names = []
    for sess, text in _bench_onnx.twins(op, layer, shape, threads=1):
        call, y = _bench_onnx.runner(sess, x)
        call()
        close(y, want, f"{text}, io_binding into the preallocated y")
        close(sess.run(None, {"x": x})[0], want, f"{text}, sess.run")
        names.append(text)
    # the last graph (the older opsets' form, or the only one) loads on any ORT the bench supports
    assert names[-1] == _bench_onnx.graph_names(op)[-1]


def test_a_graph_this_runtime_cannot_load_is_skipped(monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    assert _bench_onnx.import_onnx()

    def unknown_op(layer, shape):
        raise ValueError("No Op registered for GroupNormalization with domain_version of 21")

    shape = small_shape("gn")
    layer = _bench.normkit_layer("gn", shape, F32).eval()
    subgraph = _bench_onnx.GRAPHS["gn"][1]
    monkeypatch.setitem(_bench_onnx.GRAPHS, "gn", (("GroupNormalization-21", unknown_op), subgraph))
    assert [text for _, text in _bench_onnx.twins("gn", layer, shape, 1)] == [subgraph[0]]
    monkeypatch.setitem(_bench_onnx.GRAPHS, "gn", (("GroupNormalization-21", unknown_op),))
    with pytest.raises(RuntimeError, match="domain_version of 21"):
        list(_bench_onnx.twins("gn", layer, shape, 1))


# -- a whole run -------------------------------------------------------------------------------
@pytest.fixture
def restore_threads():
    """The run sets normkit's and torch's process-wide thread counts: put them back."""
    try:
        import torch
    except ImportError:
        torch = None
    before = normkit.get_num_threads(), torch.get_num_threads() if torch else None
    yield
    normkit.set_num_threads(before[0])
    if torch is not None:
        torch.set_num_threads(before[1])


def test_quick_run_prints_tables_and_writes_json(tmp_path, monkeypatch, capsys, restore_threads):
    monkeypatch.setattr(_bench, "QUICK", _bench.Timing(1, 0.0005, 0.0))  # structure, not timings
    monkeypatch.setattr(_bench, "last_level_cache_bytes", lambda: 1 << 20)
    path = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--shapes", "tiny", "--ops", "bn,ln", "--layouts", "NCHW,NHWC",
            "--dtypes", "float32,bfloat16", "--threads", "1", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for title in ("== BatchNorm2d  NCHW  float32", "== BatchNorm2d  NHWC  float32",
                  "== LayerNorm  NCHW  float32", "per-call overhead", "targets:", "% roof"):
        assert title in out, title
    assert "== LayerNorm  NHWC" not in out
    doc = json.loads(path.read_text())
    assert doc["threads"] == 1 and doc["quick"] is True
    assert doc["byte_model"] == _bench.BYTE_MODEL
    for key in ("normkit_version", "torch_version", "onnxruntime_version", "cpu_info", "legend",
                "ort_graphs", "notes"):
        assert key in doc, key
    assert all(int(n) > 0 and bw > 0 for n, bw in doc["copy_bandwidth_bytes_per_s"].items())
    rows = doc["rows"]
    dtypes = ["float32"] + (["bfloat16"] if _bench.ml_dtypes else [])
    want = {(op, layout, dt, mode) for dt in dtypes for op, layout in (("bn", "NCHW"), ("bn", "NHWC"),
                                                                        ("ln", "NCHW"))
            for mode in _bench.MODES}
    assert {(r["op"], r["layout"], r["dtype"], r["mode"]) for r in rows} == want and len(rows) == len(want)
    keys = {"layer", "shape", "bytes", "normkit_s", "torch_s", "ort_s", "best", "speedup", "torch_speedup",
            "normkit_gbps", "roof_fraction", "targets", "target", "target_met"}
    for r in rows:
        assert keys <= set(r), keys - set(r)
        itemsize = 4 if r["dtype"] == "float32" else 2
        assert r["normkit_s"] > 0
        assert r["bytes"] == _bench.BYTE_MODEL[r["mode"]] * np.prod(r["shape"]) * itemsize
        ort_row = (r["mode"], r["layout"], r["dtype"]) == ("infer", "NCHW", "float32")
        assert (r["ort_s"] is not None) == (ort_row and _bench_onnx.ort is not None), r
        # 1 thread: every float32 row is held to >= 1x torch; other dtypes have no target
        one_thread = [{"metric": "torch_speedup", "threshold": 1.0}]
        assert r["targets"] == (one_thread if r["dtype"] == "float32" else [])
        if _bench.torch is not None and r["dtype"] == "float32":
            assert r["torch_s"] is not None and r["target_met"] in (True, False)
    assert [o["op"] for o in doc["overhead"]] == ["bn", "ln"]
    assert all(o["normkit_us"] > 0 and o["target_us"] == 3.0 for o in doc["overhead"])
    s = doc["summary"]
    assert s["rows_with_targets"] == 2 * 4 + 4 + 2  # float32 rows, and the per-call overheads
    assert len(s["misses"]) == s["rows_with_targets"] - s["met"] - s["not_evaluated"]


# -- `bench --variants`: the issue-10 variants beside BatchNorm2d --------------------------------
def test_variant_row_ratio_roofline_and_target():
    from normkit import _bench_variants as bv
    row = bv.make_row("ebn", (8, 16, 8, 8), "fwd+bwd", 1.5e-3, 1e-3, 32768, 50e9)
    assert row["ratio"] == pytest.approx(1.5) and row["target_met"] is True  # <= 1.5: met
    assert row["bytes"] == 5 * 32768 and row["roof_fraction"] == pytest.approx(5 * 32768 / 1.5e-3 / 50e9)
    assert row["batchnorm_roof_fraction"] == pytest.approx(5 * 32768 / 1e-3 / 50e9)
    assert not row["one_pass_expected"]
    row = bv.make_row("ebn", (8, 16, 8, 8), "infer", 1.51e-3, 1e-3, 32768, 50e9)
    assert row["bytes"] == 2 * 32768 and row["target_met"] is False and row["one_pass_expected"]
    row = bv.make_row("ghost_ew", (8, 16, 8, 8), "infer", 1e-3, 1e-3, 32768, 50e9)
    assert row["path"] == "infer (per-sample)" and not row["one_pass_expected"]
    assert bv.make_row("frozen", (8, 16, 8, 8), "fwd+bwd", 1e-3, 1e-3, 1, 1.0)["one_pass_expected"]


def test_variant_shapes_and_configurations_follow_the_issue():
    from normkit import _bench_variants as bv
    assert bv.shapes_for(None) == bv.shapes_for("all") == [(32, 64, 56, 56), (8, 256, 14, 14)]
    assert bv.shapes_for("tiny") == [(8, 16, 8, 8)]
    assert not parse([]).variants and parse(["--variants"]).variants
    assert [bv.ghost_size(s) for s in ((32, 1, 1, 1), (8, 1, 1, 1), (3, 1, 1, 1))] == [8, 2, 1]
    shape = (32, 64, 56, 56)
    layers = {k: spec[1](shape) for k, spec in bv.VARIANTS.items()}
    assert [type(layers[k]).__name__ for k in bv.VARIANTS] == [
        "ExtendedBatchNorm2d", "ModalityBatchNorm2d", "GhostBatchNorm2d", "GhostBatchNorm2d",
        "GhostBatchNorm2d", "BatchRenorm2d", "FrozenBatchNorm2d", "MovingAverageBatchNorm2d",
        "CrossIterationBatchNorm2d", "BatchKalmanNorm2d"]
    # issue 10's variants within 1.5x, issue 12's training steps within 2x
    assert {k: spec[3] for k, spec in bv.VARIANTS.items()} == {
        **{k: 1.5 for k in ("ebn", "mbn", "ghost", "ghost_gn", "ghost_ew", "renorm", "frozen")},
        "mabn": 2.0, "cbn": 2.0, "bkn": 2.0}
    W, dmean, dsqmean = bv.conv_inputs(shape)
    assert W.shape == dmean.shape == dsqmean.shape == (64, 64, 3, 3)
    assert [a.shape for a in bv.prior(shape)] == [(64,), (64,)]
    g = {k: (layers[k].ghost_batch_size, layers[k].channels_per_group, layers[k].example_weight)
         for k in ("ghost", "ghost_gn", "ghost_ew")}
    assert g == {"ghost": (8, 1, 0.0), "ghost_gn": (8, 4, 0.0), "ghost_ew": (8, 1, 0.5)}
    assert list(bv.modality(5)) == [0, 1, 0, 1, 0]
    assert set(bv.ONE_PASS_INFER) == set(bv.VARIANTS) - {"ghost_ew"}


def test_variants_quick_run_needs_no_torch_and_writes_json(tmp_path, monkeypatch, capsys, restore_threads):
    from normkit import _bench_variants as bv
    monkeypatch.setattr(_bench, "QUICK", _bench.Timing(1, 0.0005, 0.0))  # structure, not timings
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    path = tmp_path / "variants.json"
    assert main(["bench", "--variants", "--quick", "--shapes", "tiny", "--threads", "1",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    title = next(line for line in out.splitlines() if line.startswith("variant "))
    for column in ("shape", "mode", "normkit ms", "BN ms", "ratio", "% roof", "target", "met"):
        assert column in title, column
    shape = (8, 16, 8, 8)
    lines = out.splitlines()
    for key, spec in bv.VARIANTS.items():
        for mode in bv.VARIANT_MODES:
            want = [ln for ln in lines if ln.startswith(spec[0](shape) + " ")
                    and f" {bv.mode_text(key, mode)} " in ln]
            assert len(want) == 1, (key, mode)
            assert want[0].split()[-1] in ("ok", "MISS") and want[0].split()[-2] == f"<={spec[3]:g}x"
    assert "infer (per-sample)" in out and "targets: " in out
    notes = [ln for ln in lines if ln.startswith("note: ")]
    assert len(notes) == len(bv.ONE_PASS_INFER) + 1
    assert all("one pass" in n for n in notes)
    doc = json.loads(path.read_text())
    assert doc["threads"] == 1 and doc["quick"] is True
    assert doc["target_ratios"] == {k: spec[3] for k, spec in bv.VARIANTS.items()}
    assert doc["byte_model"] == {"fwd+bwd": 5, "infer": 2}
    rows = doc["variant_rows"]
    assert {(r["variant"], r["mode"]) for r in rows} == {(k, m) for k in bv.VARIANTS for m in bv.VARIANT_MODES}
    assert len(rows) == len(bv.VARIANTS) * len(bv.VARIANT_MODES)
    for r in rows:
        assert r["shape"] == list(shape) and r["dtype"] == "float32" and r["layout"] == "NCHW"
        assert r["normkit_s"] > 0 and r["batchnorm_s"] > 0
        assert r["ratio"] == pytest.approx(r["normkit_s"] / r["batchnorm_s"])
        assert r["target_met"] == (r["ratio"] <= bv.VARIANTS[r["variant"]][3])
        assert r["bytes"] == _bench.BYTE_MODEL[r["mode"]] * np.prod(shape) * 4 and r["roof_fraction"] > 0
    assert doc["notes"] == [n[len("note: "):] for n in notes]
    # the second table: issue 11's batch-independent layers beside GroupNorm, after the first's summary
    assert out.index("targets: ") < out.index("== batch-independent layers (issue 11) beside GroupNorm")
    free = out[out.index("== batch-independent layers"):].splitlines()
    title = next(line for line in free if line.startswith("layer "))
    for column in ("shape", "mode", "normkit ms", "GN ms", "ratio", "% roof", "target", "met"):
        assert column in title, column
    assert any(ln.startswith("target (issue 11): ratio <= 1.5 for FilterResponseNorm2d") and "<= 3 for ProxyNorm2d"
               in ln for ln in free)
    for key, spec in bv.FREE_LAYERS.items():
        for mode in bv.VARIANT_MODES:
            want = [ln for ln in free if ln.startswith(spec[0](shape) + " ") and f" {mode} " in ln]
            assert len(want) == 1, (key, mode)
            assert want[0].split()[-1] in ("ok", "MISS") and want[0].split()[-2] == f"<={spec[2]:g}x"
    free_notes = [ln for ln in free if ln.startswith(bv.FREE_NOTE_PREFIX)]
    assert len(free_notes) == 2
    assert any(ln.startswith("beside GroupNorm (issue 11), target ratio <= 1.5 for") and " met" in ln for ln in free)
    assert doc["batch_free_target_ratios"] == {k: spec[2] for k, spec in bv.FREE_LAYERS.items()}
    rows = doc["batch_free_rows"]
    assert [(r["variant"], r["mode"]) for r in rows] == [(k, m) for m in bv.VARIANT_MODES for k in bv.FREE_LAYERS]
    for r in rows:
        assert r["shape"] == list(shape) and r["dtype"] == "float32" and r["layout"] == "NCHW"
        assert r["reference"] == "GroupNorm(16)" and r["normkit_s"] > 0 and r["groupnorm_s"] > 0
        assert r["ratio"] == pytest.approx(r["normkit_s"] / r["groupnorm_s"])
        assert r["target_met"] == (r["ratio"] <= r["target_ratio"])
        assert r["bytes"] == _bench.BYTE_MODEL[r["mode"]] * np.prod(shape) * 4 and r["roof_fraction"] > 0
    assert doc["batch_free_notes"] == [n[len(bv.FREE_NOTE_PREFIX):] for n in free_notes]
    assert doc["batch_free_summary"][0] in out and len(doc["batch_free_legend"]) == 3
    # the third table: conv2d_stat_jacobians beside torch's weight gradient; without torch, normkit's time only
    conv = out[out.index("== conv2d_stat_jacobians (issue 12)"):].splitlines()
    assert next(ln for ln in conv if ln.startswith("input ")).split()[-3:] == ["ratio", "target", "met"]
    (row,) = doc["conv_jacobian_rows"]
    assert row["shape"] == list(shape) and row["weight_shape"] == [16, 16, 3, 3] and row["padding"] == 1
    assert row["normkit_s"] > 0 and row["normkit_gflops"] > 0
    assert row["torch_weight_grad_s"] is None and row["ratio"] is None and row["target_met"] is None
    assert any(ln.startswith("8x16x8x8 ") and ln.split()[-3:] == ["-", "<=2x", "-"] for ln in conv)
    assert "torch is not installed: normkit's time only" in conv


def test_batch_free_row_ratio_roofline_and_target():
    from normkit import _bench_variants as bv
    row = bv.make_free_row("frn", (8, 16, 8, 8), "fwd+bwd", 1.5e-3, 1e-3, 32768, 50e9)
    assert row["ratio"] == pytest.approx(1.5) and row["target_ratio"] == 1.5 and row["target_met"] is True
    assert row["bytes"] == 5 * 32768 and row["roof_fraction"] == pytest.approx(5 * 32768 / 1.5e-3 / 50e9)
    assert row["groupnorm_roof_fraction"] == pytest.approx(5 * 32768 / 1e-3 / 50e9)
    assert row["reference"] == "GroupNorm(16)" and row["path"] == "fwd+bwd"
    row = bv.make_free_row("bcn", (8, 16, 8, 8), "infer", 1.51e-3, 1e-3, 32768, 50e9)
    assert row["bytes"] == 2 * 32768 and row["target_met"] is False
    for key in ("proxy_relu", "proxy_gelu"):  # Proxy Norm: within 3x
        assert bv.make_free_row(key, (8, 16, 8, 8), "infer", 3e-3, 1e-3, 1, 1.0)["target_met"] is True
        assert bv.make_free_row(key, (8, 16, 8, 8), "infer", 3.01e-3, 1e-3, 1, 1.0)["target_met"] is False


def test_batch_free_layers_follow_the_issue():
    from normkit import _bench_variants as bv
    assert list(bv.FREE_LAYERS) == ["frn", "evonorm_b0", "evonorm_s0", "bcn", "bln", "ln2d", "lrn",
                                    "proxy_relu", "proxy_gelu"]
    assert {k: spec[2] for k, spec in bv.FREE_LAYERS.items()} == {
        "frn": 1.5, "evonorm_b0": 1.5, "evonorm_s0": 1.5, "bcn": 1.5, "bln": 1.5, "ln2d": 1.5, "lrn": 3.0,
        "proxy_relu": 3.0,
        "proxy_gelu": 3.0}
    assert [bv.groups((1, c, 1, 1)) for c in (64, 256, 16, 48)] == [32, 32, 16, 24]
    for shape in bv.shapes_for(None):
        layers = {k: spec[1](shape) for k, spec in bv.FREE_LAYERS.items()}
        assert [type(layers[k]).__name__ for k in bv.FREE_LAYERS] == [
            "FilterResponseNorm2d", "EvoNormB0_2d", "EvoNormS0_2d", "BatchChannelNorm2d", "BatchLayerNorm2d",
            "LayerNorm2d",
            "LocalResponseNorm", "ProxyNorm2d", "ProxyNorm2d"]
        assert layers["frn"].tlu is True
        assert layers["evonorm_s0"].groups == layers["bcn"].num_groups == 32
        assert (layers["proxy_relu"].activation, layers["proxy_gelu"].activation) == ("relu", "gelu")
        assert all(layer.num_features == shape[1] for k, layer in layers.items() if k != "lrn")
        assert layers["bln"].batch_size == shape[0]


def test_conv_jacobians_row_beside_torch_weight_gradient(restore_threads):
    torch = pytest.importorskip("torch")
    from normkit import _bench_variants as bv
    normkit.set_num_threads(1)
    threads = torch.get_num_threads()
    row = bv.bench_conv_jacobians((2, 4, 6, 6), 3, _bench.Timing(1, 0.0005, 0.0), out_channels=5)
    assert torch.get_num_threads() == threads  # torch's own setting comes back
    assert row["weight_shape"] == [5, 4, 3, 3] and row["threads"] == 1 and row["dtype"] == "float32"
    assert row["torch_op"] == "torch.nn.grad.conv2d_weight"
    assert row["torch_weight_grad_s"] > 0 and row["torch_forward_weight_grad_s"] > 0
    assert row["ratio"] == pytest.approx(row["normkit_s"] / row["torch_weight_grad_s"])
    assert row["target_met"] == (row["ratio"] <= bv.CONV_TARGET_RATIO) and bv.CONV_TARGET_RATIO == 2.0
    line = bv.conv_line(row)
    assert line.startswith("2x4x6x6 ") and " 5x4x3x3 " in line and line.split()[-2] == "<=2x"
    assert line.split()[-1] == ("ok" if row["target_met"] else "MISS")
