"""The hand-written dense net: gradients against autograd, and SGD that learns."""

from __future__ import annotations

import pytest
import torch

from tasks.cifar10_dense import PARAMS, dense_forward_backward, init_dense, sgd_update


def _batch(n=8, d=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("reg", [0.0, 0.05])
def test_hand_gradients_match_autograd(reg):
    """dZ2 = ŷ − y summed over the batch (not / N) and dW += reg·W are the exact gradients of
    N·mean CE + (reg/2)(|W1|² + |W2|²)."""
    x, y = _batch()
    net = init_dense(12, 6, 4, std=0.5, generator=torch.Generator().manual_seed(1))
    net.b1.normal_(0, 0.1)
    net.b2.normal_(0, 0.1)
    _, _, grads = dense_forward_backward(net, x, y, reg)

    leaves = {name: getattr(net, name).clone().requires_grad_(True) for name in PARAMS}
    h = torch.sigmoid(x @ leaves["W1"] + leaves["b1"])
    logits = h @ leaves["W2"] + leaves["b2"]
    ce_sum = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    objective = ce_sum + reg / 2 * (leaves["W1"].square().sum() + leaves["W2"].square().sum())
    objective.backward()
    for name in PARAMS:
        torch.testing.assert_close(grads[name], leaves[name].grad, rtol=1e-5, atol=1e-6)


def test_loss_value_is_mean_ce_plus_reg():
    x, y = _batch()
    net = init_dense(12, 6, 4, std=0.5, generator=torch.Generator().manual_seed(1))
    loss, correct, _ = dense_forward_backward(net, x, y, reg=0.1)
    logits = net(x)
    expected = torch.nn.functional.cross_entropy(logits, y) + 0.1 * (
        net.W1.square().sum() + net.W2.square().sum()
    )
    torch.testing.assert_close(loss, expected)
    assert correct.item() == (logits.argmax(1) == y).sum().item()


def test_init_is_normal_with_std_and_zero_biases():
    net = init_dense(3072, 100, 10, std=1e-5, generator=torch.Generator().manual_seed(0))
    assert net.b1.abs().sum() == 0 and net.b2.abs().sum() == 0
    assert abs(net.W1.std().item() - 1e-5) < 1e-7
    assert not any(getattr(net, p).requires_grad for p in PARAMS)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_reduces_loss(momentum):
    x, y = _batch(n=64, d=12, k=4, seed=3)
    net = init_dense(12, 16, 4, std=0.1, generator=torch.Generator().manual_seed(2))
    velocity = {p: torch.zeros_like(getattr(net, p)) for p in PARAMS}
    first, _, _ = dense_forward_backward(net, x, y, 0.0)
    for _ in range(200):
        _, _, grads = dense_forward_backward(net, x, y, 0.0)
        sgd_update(net, grads, lr=2e-2, momentum=momentum, velocity=velocity)
    last, correct, _ = dense_forward_backward(net, x, y, 0.0)
    assert last < first * 0.5
    assert correct.item() > 40


def test_sgd_update_is_w_minus_lr_grad():
    net = init_dense(3, 2, 2, std=1.0, generator=torch.Generator().manual_seed(0))
    before = net.W1.clone()
    grads = {p: torch.ones_like(getattr(net, p)) for p in PARAMS}
    sgd_update(net, grads, lr=0.5, momentum=0.0, velocity={})
    torch.testing.assert_close(net.W1, before - 0.5)
