"""The demonstration's real-image target: scikit-learn's bundled digits, loaded without network."""

from __future__ import annotations

import socket

import torch

from petl_surgery.demo import digits as digits_module
from petl_surgery.demo.digits import DIGITS, TEST_POOL


def test_digits_load_with_the_network_blocked(monkeypatch):
    digits_module._digits.cache_clear()
    digits_module._split.cache_clear()

    def no_network(*args, **kwargs):
        raise OSError("network blocked in this test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    images, labels = digits_module._digits()
    assert images.shape == (1797, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert images.min() == -1.0 and images.max() == 1.0


def test_test_images_are_never_drawn_for_training():
    test_pools, train_pools = digits_module._split()
    for test, train in zip(test_pools, train_pools):
        assert len(test) == TEST_POOL and not set(test.tolist()) & set(train.tolist())
    x, y = DIGITS.test_set(5)
    assert torch.equal(y, torch.arange(10).repeat_interleave(5)) and DIGITS.kind == "real"
    pool, labels = DIGITS.train_pool()
    assert len(pool) == 1797 - 10 * TEST_POOL and torch.equal(labels, labels.sort().values)
    assert not any(torch.equal(image, test) for test in x for image in pool[::7])
