"""One job of the study: train the CNN with one variant at one batch size from one seed, then
measure test accuracy in inference mode. Deterministic: the seed fixes the initial weights (the
same for every variant) and the order of the batches (the same for every variant at a batch size).

The data: scikit-learn's bundled 8x8 digits (1797 images, no download), a fixed stratified split
(75% train, 25% test, the same for every seed), pixels scaled by the training set's mean and
standard deviation. Training drops the last partial batch of each epoch (a batch of one has no
batch statistics). The learning rate follows the linear scaling rule, LR * batch_size / 32, with
a linear decay to zero over the run; SGD with momentum 0.9, no weight decay.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from . import model
from .net import Net, SGD
from .norms import VARIANTS

LR = 0.05  # at batch size 32
MOMENTUM = 0.9
REFERENCE_BATCH = 32
TEST_FRACTION = 0.25
SPLIT_SEED = 0


def learning_rate(batch_size: int) -> float:
    return LR * batch_size / REFERENCE_BATCH


def load_data(limit: int | None = None) -> dict[str, npt.NDArray[Any]]:
    """The digits split: dict of float32 images (N, 1, 8, 8), their im2col cols and int labels;
    `limit`: keep only the first `limit` training images (for quick checks)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float64)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=TEST_FRACTION,
                                                        random_state=SPLIT_SEED, stratify=digits.target)
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    return prepare(x_train, y_train, x_test, y_test)


def prepare(x_train: npt.NDArray[Any], y_train: npt.ArrayLike, x_test: npt.NDArray[Any],
            y_test: npt.ArrayLike) -> dict[str, npt.NDArray[Any]]:
    """The data dict from raw images (N, 8, 8) and labels: standardized, float32, with cols."""
    mean, std = x_train.mean(), x_train.std()
    data: dict[str, npt.NDArray[Any]] = {}
    for part, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x = ((x - mean) / std).astype(np.float32)[:, None]
        data[f"x_{part}"] = np.ascontiguousarray(x)
        data[f"cols_{part}"] = model.im2col(x)
        data[f"y_{part}"] = np.asarray(y, np.int64)
    return data


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return n_train // batch_size


def run_job(variant: str, batch_size: int, seed: int, epochs: int,
            data: Mapping[str, npt.NDArray[Any]]) -> dict[str, Any]:
    """Train and test one (variant, batch size, seed): a dict with the test accuracy, the mean
    training loss of the last epoch, and whether training diverged (a non-finite loss: training
    stops there, and the accuracy is that of the model as it is)."""
    spec = VARIANTS[variant]
    net = Net(spec, batch_size, np.random.default_rng(seed))
    order_rng = np.random.default_rng([seed, batch_size])
    x, cols, y = data["x_train"], data["cols_train"], data["y_train"]
    n = len(y)
    per_epoch = steps_per_epoch(n, batch_size)
    total = per_epoch * epochs
    if spec.kind == "frozen":  # the frozen statistics: measured once, on the initial network
        net.eval()
        net.forward(x, cols, calibrate=True)
    net.train()
    opt = SGD(net.parameters(), MOMENTUM)
    lr0 = learning_rate(batch_size)
    step, diverged, last_loss = 0, False, float("nan")
    with np.errstate(all="ignore"):  # a diverging variant is a result, not a warning
        for _ in range(epochs):
            order = order_rng.permutation(n)
            losses = 0.0
            for k in range(per_epoch):
                idx = order[k * batch_size:(k + 1) * batch_size]
                loss, dlogits = model.cross_entropy(net.forward(x[idx], cols[idx]), y[idx])
                if not np.isfinite(loss):
                    diverged = True
                    break
                losses += loss
                net.backward(dlogits)
                opt.step(net.gradients(), lr0 * (1 - step / total))
                step += 1
            if diverged:
                break
            last_loss = losses / per_epoch
        net.eval()
        logits = net.forward(data["x_test"], data["cols_test"])
        accuracy = float(np.mean(logits.argmax(axis=1) == data["y_test"]))
    return {"variant": variant, "batch_size": batch_size, "seed": seed, "accuracy": accuracy,
            "train_loss": last_loss, "diverged": diverged, "steps": step}
