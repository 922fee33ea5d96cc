"""Empty batches through every batch-statistics variant, as torch's BatchNorm treats them: an
empty output and input gradient, zero parameter gradients, running statistics untouched."""
import numpy as np
import pytest

import normkit

LAYERS = {
    "EBN": lambda: normkit.ExtendedBatchNorm2d(4),
    "MBN": lambda: normkit.ModalityBatchNorm2d(4),
    "MBN-separate": lambda: normkit.ModalityBatchNorm2d(4, separate_affine=True),
    "Ghost": lambda: normkit.GhostBatchNorm2d(4, 2),
    "Ghost-BN+GN": lambda: normkit.GhostBatchNorm2d(4, 2, channels_per_group=2),
    "Ghost-weighed": lambda: normkit.GhostBatchNorm2d(4, 2, example_weight=0.5),
    "Renorm": lambda: normkit.BatchRenorm2d(4),
    "Frozen": lambda: normkit.FrozenBatchNorm2d(4),
    "BLN": lambda: normkit.BatchLayerNorm2d(4, 8),
    "MABN": lambda: normkit.MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=0),
    "BKN": lambda: normkit.BatchKalmanNorm2d(4),
    "BKN-prior-features": lambda: normkit.BatchKalmanNorm2d(4, 3),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3)], ids=["no-samples", "no-pixels"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_an_empty_batch_gives_empty_results_and_changes_no_state(name, shape, mode):
    layer = getattr(LAYERS[name](), mode)()
    args = (np.zeros(shape[0], np.int64),) if name.startswith("MBN") else ()
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    y = layer(np.zeros(shape, np.float32), *args)
    dx = layer.backward(np.zeros(shape, np.float32))
    assert y.shape == dx.shape == shape
    assert set(layer.grads) == set(layer.parameters())
    for g in layer.grads.values():
        assert not np.any(g)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
