"""trainer.calibration: the temperature a trained orientation head is exported with."""
import numpy as np

from trainer import calibration


def test_fit_temperature_undoes_a_known_overconfidence():
    rng = np.random.default_rng(0)
    n = 3000
    # Calibrated answers: the truth drawn from them; then made over-confident by T = 0.5 (logits doubled).
    logits = rng.normal(0, 1.5, (n, 4))
    calibrated = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in calibrated])
    sharp = calibration.with_temperature(calibrated, 0.5)
    temperature = calibration.fit_temperature(sharp, labels)
    assert 1.8 < temperature < 2.2
    assert calibration.negative_log_likelihood(calibration.with_temperature(sharp, temperature), labels) < \
        calibration.negative_log_likelihood(sharp, labels)
    # Weights: the rows weighted 0 do not count (here: labels scrambled on them).
    scrambled = np.where(np.arange(n) < n // 2, (labels + 1) % 4, labels)
    weights = (np.arange(n) >= n // 2).astype(np.float32)
    assert abs(calibration.fit_temperature(sharp, scrambled, weights) - temperature) < 0.3


def test_fold_temperature_is_softmax_at_that_temperature():
    import keras

    from trainer.model import OrientationHead

    head = OrientationHead(grid=2, projection_channels=4, hidden_units=8, dropout=0.0)
    features = np.random.default_rng(1).normal(size=(5, 4, 4, 16)).astype(np.float32)
    keras.utils.set_random_seed(0)
    before = head(features).numpy()
    calibration.fold_temperature(head, 2.5)
    np.testing.assert_allclose(head(features).numpy(), calibration.with_temperature(before, 2.5), atol=1e-5)
