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


def _answers(rng, records: int, temperature: float, wrong: bool = False):
    """[records * 4] answers of a head at `temperature` over calibrated ones (wrong: sure of the wrong turn)."""
    logits = rng.normal(0, 1.5, (records * 4, 4))
    calibrated = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in calibrated])
    if wrong:
        labels = (calibrated.argmax(1) + 1) % 4
    return calibration.with_temperature(calibrated, temperature), labels


def test_the_val_records_a_person_answered_do_not_enter_the_fit():
    """train --corrections: the answered val records (the review queue's hardest pages, which the tuned head gets
    wrong) would push the temperature up and make the head unsure of every page; the fit reads only the others."""
    rng = np.random.default_rng(4)
    easy_probs, easy_labels = _answers(rng, 200, 0.5)  # 200 unanswered records: over-confident by T = 0.5
    hard_probs, hard_labels = _answers(rng, 60, 0.5, wrong=True)  # 60 answered: sure and wrong
    probs, labels = np.concatenate([easy_probs, hard_probs]), np.concatenate([easy_labels, hard_labels])
    keys = [f"file:///a/{i // 4:04d}.jpg#0" for i in range(len(labels))]
    answered = {f"file:///a/{r:04d}.jpg#0" for r in range(200, 260)}
    weights = np.ones(len(labels), np.float32)
    fit = calibration.fit_unanswered(probs, labels, weights, keys, answered)
    assert (fit.records, fit.examples, fit.answered_left_out) == (200, 800, 60)
    assert fit.temperature == calibration.fit_temperature(easy_probs, easy_labels)
    assert 1.7 < fit.temperature < 2.3 and fit.nll_after < fit.nll_before
    # Whatever the answered records hold, the fit is the same: they are not read.
    flipped = np.concatenate([easy_labels, (hard_labels + 2) % 4])
    assert calibration.fit_unanswered(probs, flipped, weights, keys, answered).temperature == fit.temperature
    # Read (the calibration before this fix), they would have made every page less sure.
    assert calibration.fit_unanswered(probs, labels, weights, keys).temperature > fit.temperature + 1.0
    # Records without an orientation (weight 0, e.g. answered no_up) count on neither side.
    unknown = weights.copy()
    unknown[:40] = 0
    assert calibration.fit_unanswered(probs, labels, unknown, keys, answered).records == 190


def test_too_few_unanswered_val_records_give_no_fit_and_say_why():
    rng = np.random.default_rng(5)
    probs, labels = _answers(rng, 30, 0.5)
    keys = [f"r{i // 4}" for i in range(len(labels))]
    fit = calibration.fit_unanswered(probs, labels, np.ones(len(labels)), keys, {f"r{r}" for r in range(10)})
    assert fit.temperature is None and (fit.records, fit.answered_left_out) == (20, 10)
    assert f"20 val records have an orientation no one answered, a temperature needs {calibration.MIN_RECORDS}" \
        in fit.why_not and "10 answered ones left out" in fit.why_not
