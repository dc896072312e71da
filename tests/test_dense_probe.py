"""The dense probe's pieces against hand-computed values: class mapping, majority patch labels, weighted ridge
(against numpy's least squares on the equivalent augmented system) and mIoU."""

import numpy as np

from vlp.eval import dense


def test_mask_classes_and_patch_labels():
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, :2, :2] = 1 + 10  # label 10 -> shape 10 % 8 = 2 -> class 3
    mask[0, 2:, 2:3] = 1 + 63  # label 63 -> shape 7 -> class 8 (2 of the patch's 4 pixels: a tie with background)
    mask[0, 0, 3] = 1 + 8  # one pixel of label 8 (shape 0 -> class 1) in the top-right patch
    classes = dense.mask_classes(mask)
    assert classes[0, 0, 0] == 3 and classes[0, 3, 2] == 8 and classes[0, 0, 3] == 1 and classes[0, 3, 3] == 0
    # 2x2 patches, majority class, ties to the smaller class id
    np.testing.assert_array_equal(dense.patch_labels(classes, 2, 9), [[3, 0, 0, 0]])


def test_weighted_ridge_matches_least_squares():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    labels = np.r_[np.zeros(40, int), np.ones(15, int), np.full(5, 2)]
    mean, std, weights = dense.ridge_fit(x, labels, 3, ridge=0.1)
    # Independent form: sqrt(w)-scaled rows stacked with sqrt(ridge * sum w) * I, solved by lstsq.
    w = np.array([60 / (3 * 40)] * 40 + [60 / (3 * 15)] * 15 + [60 / (3 * 5)] * 5)
    a = np.c_[(x - x.mean(0)) / (x.std(0) + 1e-6), np.ones(60)]
    b = np.eye(3)[labels]
    lam = np.sqrt(0.1 * w.sum())
    aug_a = np.r_[a * np.sqrt(w)[:, None], lam * np.eye(6)]
    aug_b = np.r_[b * np.sqrt(w)[:, None], np.zeros((6, 3))]
    np.testing.assert_allclose(weights, np.linalg.lstsq(aug_a, aug_b, rcond=None)[0], rtol=1e-8, atol=1e-10)
    # Separable features are classified perfectly.
    separable = np.eye(3)[labels] * 5 + rng.normal(scale=0.1, size=(60, 3))
    model = dense.ridge_fit(separable, labels, 3, ridge=1e-4)
    np.testing.assert_array_equal(dense.ridge_predict(model, separable), labels)


def test_mean_iou():
    target = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    # class 0: |{0}| / |{0, 1, 5}| = 1/3; class 1: 2/3; class 2: 1/2; class 3 absent from both: left out
    assert abs(dense.mean_iou(pred, target, 4) - (1 / 3 + 2 / 3 + 1 / 2) / 3) < 1e-12
