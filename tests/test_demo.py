"""`python -m normkit demo`: the CNN's own gradients, every variant's step, determinism, the
files a run writes, and the command line's errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

import normkit
from normkit.__main__ import main
from normkit.demo import model, study, train
from normkit.demo.net import SGD, Net
from normkit.demo.norms import VARIANTS


# -- finite differences, float64 ------------------------------------------------------------------

def numerical_gradient(f, a, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of a (changed in place)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def assert_close(got, want, tol=1e-7):
    scale = max(1.0, float(np.max(np.abs(want))))
    assert np.max(np.abs(got - want)) <= tol * scale, f"max error {np.max(np.abs(got - want))}"


def test_conv_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    r = rng.standard_normal((2, 4, 4, 5))  # loss = sum(conv(x) * r), so dy = r
    loss = lambda: float(np.sum(model.conv_forward(model.im2col(x), w, b, (4, 5)) * r))  # noqa: E731
    dw, db, dx = model.conv_backward(r, model.im2col(x), w, True, x.shape)
    assert_close(dw, numerical_gradient(loss, w))
    assert_close(db, numerical_gradient(loss, b))
    assert_close(dx, numerical_gradient(loss, x))


def test_conv_is_a_zero_padded_3x3_correlation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 3, 4))
    w = rng.standard_normal((3, 2, 3, 3))
    y = model.conv_forward(model.im2col(x), w, None, (3, 4))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros((2, 3, 3, 4))
    for n in range(2):
        for o in range(3):
            for h in range(3):
                for v in range(4):
                    want[n, o, h, v] = np.sum(xp[n, :, h:h + 3, v:v + 3] * w[o])
    assert_close(y, want, 1e-12)


def test_linear_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((3, 6)), rng.standard_normal((4, 6)), rng.standard_normal(4)
    r = rng.standard_normal((3, 4))
    loss = lambda: float(np.sum(model.linear_forward(x, w, b) * r))  # noqa: E731
    dw, db, dx = model.linear_backward(r, x, w)
    assert_close(dw, numerical_gradient(loss, w))
    assert_close(db, numerical_gradient(loss, b))
    assert_close(dx, numerical_gradient(loss, x))


def test_pool_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 6))  # no ties
    r = rng.standard_normal((2, 3, 2, 3))
    y, masks = model.pool_forward(x)
    assert_close(y, x.reshape(2, 3, 2, 2, 3, 2).max(axis=(3, 5)), 0)
    loss = lambda: float(np.sum(model.pool_forward(x)[0] * r))  # noqa: E731
    assert_close(model.pool_backward(r, masks), numerical_gradient(loss, x))


def test_pool_sends_a_tied_window_gradient_to_one_place():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 2:, 2:] = [[1.0, 2.0], [2.0, 0.5]]  # a tie at the maximum, and three all-zero windows
    dy = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    dx = model.pool_backward(dy, model.pool_forward(x)[1])
    windows = dx.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)
    assert np.array_equal(np.count_nonzero(windows, axis=1), [1, 1, 1, 1])
    assert np.array_equal(windows.sum(axis=1), dy.ravel())
    assert dx[0, 0, 2, 3] == 4.0 and dx[0, 0, 3, 2] == 0.0  # the first of the tied maxima


def test_cross_entropy_and_its_gradient():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((5, 4)) * 3
    labels = np.array([0, 3, 1, 1, 2])
    loss, d = model.cross_entropy(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(5), labels])), rel=1e-12)
    assert_close(d, numerical_gradient(lambda: model.cross_entropy(logits, labels)[0], logits))


def test_whole_network_gradient_matches_finite_differences():
    """The plumbing of conv, ReLU, pool, flatten and linear across both blocks, in float64."""
    rng = np.random.default_rng(5)
    net = Net(VARIANTS["none"], 3, rng)
    for block in net.blocks:
        block.w, block.b = block.w.astype(np.float64), block.b.astype(np.float64)
    net.fc_w, net.fc_b = net.fc_w.astype(np.float64), net.fc_b.astype(np.float64)
    x = rng.standard_normal((3, 1, 8, 8))
    labels = np.array([1, 7, 3])
    loss = lambda: model.cross_entropy(net.forward(x, model.im2col(x)), labels)[0]  # noqa: E731
    _, d = model.cross_entropy(net.forward(x, model.im2col(x)), labels)
    net.backward(d)
    grads = net.gradients()
    for name, p in net.parameters().items():
        assert_close(grads[name], numerical_gradient(loss, p), 1e-6)


# -- every variant trains and tests -----------------------------------------------------------------

def random_data(n_train=24, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    return train.prepare(rng.uniform(0, 16, (n_train, 8, 8)), rng.integers(0, 10, n_train),
                         rng.uniform(0, 16, (n_test, 8, 8)), rng.integers(0, 10, n_test))


def test_the_variants_are_none_and_every_2d_layer():
    layers = {n for n in normkit.__all__ if isinstance(getattr(normkit, n), type)
              and issubclass(getattr(normkit, n), normkit.NormLayer) and n != "NormLayer"}
    # Not in the study: other ranks, and SyncBatchNorm (one process: BatchNorm2d)
    left_out = {"BatchNorm1d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm3d", "SyncBatchNorm"}
    assert set(VARIANTS) == (layers - left_out) | {"none"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_takes_a_training_step_and_tests(name):
    data = random_data()
    net = Net(VARIANTS[name], 4, np.random.default_rng(0))
    params = net.parameters()
    before = {k: v.copy() for k, v in params.items()}
    idx = np.arange(4)
    loss, d = model.cross_entropy(net.forward(data["x_train"][idx], data["cols_train"][idx]), data["y_train"][idx])
    assert np.isfinite(loss)
    net.backward(d)
    grads = net.gradients()
    assert set(grads) == set(params)
    for k in params:
        assert grads[k].shape == params[k].shape and np.all(np.isfinite(grads[k])), k
    SGD(params).step(grads, 0.1)
    changed = [k for k in params if not np.array_equal(params[k], before[k])]
    assert "fc.w" in changed and "0.w" in changed and "1.w" in changed
    # every norm parameter learns, except the first BatchKalmanNorm2d's transition A (no prior)
    norm_params = [k for k in params if ".norm." in k and not (name == "BatchKalmanNorm2d" and k == "0.norm.0.A")]
    assert all(k in changed for k in norm_params), sorted(set(norm_params) - set(changed))
    net.eval()
    logits = net.forward(data["x_test"], data["cols_test"])
    assert logits.shape == (10, 10) and np.all(np.isfinite(logits))
    # and the whole job, the frozen statistics' calibration included
    r = train.run_job(name, 4, 0, 1, data)
    assert r["steps"] == 6 and not r["diverged"] and 0.0 <= r["accuracy"] <= 1.0


def test_variants_with_running_statistics_test_with_them():
    data = random_data()
    net = Net(VARIANTS["BatchNorm2d"], 4, np.random.default_rng(0))
    idx = np.arange(4)
    net.forward(data["x_train"][idx], data["cols_train"][idx])
    net.eval()
    one = net.forward(data["x_test"][:1], data["cols_test"][:1])
    many = net.forward(data["x_test"], data["cols_test"])
    np.testing.assert_allclose(one[0], many[0], rtol=1e-5, atol=1e-6)  # no batch dependence in eval


# -- determinism ------------------------------------------------------------------------------------

def test_same_seed_same_results_for_any_number_of_workers():
    data = random_data(32)
    variants = ["none", "BatchNorm2d", "CrossIterationBatchNorm2d"]
    args = (variants, [2, 8], 1, 2, data)
    first = study.run(*args, workers=1, progress=False)
    assert first == study.run(*args, workers=1, progress=False)
    assert first == study.run(*args, workers=2, progress=False)
    assert [(r["variant"], r["batch_size"], r["seed"]) for r in first] == [
        (v, bs, s) for v in variants for bs in (2, 8) for s in (0, 1)]
    assert first[0] != first[1]  # the seed matters


def test_summary_is_the_mean_over_the_seeds():
    results = [{"variant": "none", "batch_size": 2, "seed": s, "accuracy": a, "diverged": s == 1}
               for s, a in enumerate([0.5, 0.7])]
    entry = study.summarize(results, ["none"], [2])["none"][2]
    assert entry["accuracy"] == pytest.approx(0.6) and entry["std"] == pytest.approx(0.1)
    assert entry["per_seed"] == [0.5, 0.7] and entry["diverged"] == 1


# -- the command ------------------------------------------------------------------------------------

def test_tiny_run_prints_a_table_and_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "study"
    argv = ["demo", "--variants", "none,BatchNorm2d", "--batch-sizes", "4,8", "--epochs", "1", "--seeds", "1",
            "--limit", "64", "--workers", "1", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    table = text[text.index("\nvariant") + 1:]
    assert "batch 4" in table and "batch 8" in table
    assert [line.split()[0] for line in table.splitlines()[2:4]] == ["none", "BatchNorm2d"]
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["variants"] == ["none", "BatchNorm2d"]
    assert payload["config"]["batch_sizes"] == [4, 8] and payload["config"]["epochs"] == 1
    assert payload["config"]["train_images"] == 64 and payload["config"]["test_images"] == 450
    assert set(payload["results"]) == {"none", "BatchNorm2d"}
    for row in payload["results"].values():
        assert set(row) == {"4", "8"}
        for entry in row.values():
            assert set(entry) == {"accuracy", "std", "per_seed", "diverged"}
            assert 0.0 < entry["accuracy"] <= 1.0 and len(entry["per_seed"]) == 1
            assert f"{100 * entry['accuracy']:.1f}" in table
    png = (out / "accuracy_vs_batch_size.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


@pytest.mark.parametrize("argv, option", [
    (["--variants", "BatchNorm2d,NoSuchNorm"], "--variants"),
    (["--variants", ""], "--variants"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--batch-sizes", "2,-4"], "--batch-sizes"),
    (["--batch-sizes", "2,,4"], "--batch-sizes"),
    (["--batch-sizes", "1"], "--batch-sizes"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "1.5"], "--epochs"),
    (["--seeds", "x"], "--seeds"),
    (["--seeds", ""], "--seeds"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_options_exit_2_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]  # argparse prints the usage, then one line
    assert message.startswith("python -m normkit demo: error: argument " + option), message
    assert "Traceback" not in err


def test_bad_option_from_the_shell_has_no_traceback():
    p = subprocess.run([sys.executable, "-m", "normkit", "demo", "--variants", "Nope"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert "Traceback" not in p.stderr
    assert "error: argument --variants: unknown variant 'Nope'" in p.stderr.strip().splitlines()[-1]


def test_missing_extras_exit_2_with_the_install_hint(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'pip install "normkit[demo]"' in err and "scikit-learn" in err
    assert not (tmp_path / "x").exists()


def test_no_command_names_both():
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
