import pytest
import torch

from solo_deepfusion.linear_probe import linear_probe


def _blobs(n: int, dim: int, classes: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * spread
    labels = torch.arange(n) % classes
    return centers[labels] + torch.randn(n, dim, generator=g), labels


def test_separable_classes_are_found_and_noise_stays_at_chance():
    feats, labels = _blobs(900, 16, 3, spread=4.0, seed=0)
    feats, labels, test, test_labels = feats[:600], labels[:600], feats[600:], labels[600:]
    assert linear_probe(feats[:300], labels[:300], test, test_labels).accuracy == 1.0

    noise = torch.randn(900, 16, generator=torch.Generator().manual_seed(1))
    chance = linear_probe(noise[:600], labels, noise[600:], test_labels).accuracy
    assert abs(chance - 1 / 3) < 0.1


def test_is_deterministic_and_invariant_to_feature_scale():
    feats, labels = _blobs(400, 8, 4, spread=0.7, seed=2)
    first = linear_probe(feats[:300], labels[:300], feats[300:], labels[300:])
    again = linear_probe(feats[:300], labels[:300], feats[300:], labels[300:])
    scaled = linear_probe(1e3 * feats[:300], labels[:300], 1e3 * feats[300:], labels[300:])
    assert first == again
    assert scaled.accuracy == pytest.approx(first.accuracy)


def test_chooses_stronger_l2_when_features_are_mostly_noise():
    # 5 informative dimensions among 300: an unregularised probe overfits 200 samples.
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(400) % 2
    feats = torch.randn(400, 300, generator=g)
    feats[:, :5] += 1.5 * (2 * labels[:, None] - 1)
    result = linear_probe(feats[:200], labels[:200], feats[200:], labels[200:])
    assert result.weight_decay >= 1e-2
    assert result.accuracy > 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"holdout": 1.5}, "holdout"), ({"weight_decays": []}, "weight_decays")],
)
def test_bad_settings_name_the_field(kwargs, match):
    feats, labels = _blobs(40, 4, 2, spread=1.0, seed=0)
    with pytest.raises(ValueError, match=match):
        linear_probe(feats, labels, feats, labels, **kwargs)


def test_feature_width_mismatch_is_an_error():
    feats, labels = _blobs(40, 4, 2, spread=1.0, seed=0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        linear_probe(feats, labels, feats[:, :3], labels)
