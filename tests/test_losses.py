import math

import pytest
import torch

from simclrv2.losses import DistillationLoss, NTXentLoss


def brute_force_ntxent(z_a, z_b, tau, queue=None):
    """docs/method.md §3 written as a double loop in float64."""
    z = torch.cat([z_a, z_b]).double()
    z = z / z.norm(dim=1, keepdim=True)
    q = None if queue is None else queue.double() / queue.double().norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        denom = 0.0
        for k in range(n2):
            if k != i:
                denom = denom + torch.exp(z[i] @ z[k] / tau)
        if q is not None:
            for k in range(q.shape[0]):
                denom = denom + torch.exp(z[i] @ q[k] / tau)
        total = total - torch.log(torch.exp(z[i] @ z[pos] / tau) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("with_queue", [False, True])
def test_ntxent_matches_brute_force_values_and_gradients(tau, with_queue):
    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(7, 5, generator=g, dtype=torch.float64) if with_queue else None
    ref = brute_force_ntxent(z_a, z_b, tau, queue)
    ref_ga, ref_gb = torch.autograd.grad(ref, [z_a, z_b])

    za = z_a.detach().float().requires_grad_()
    zb = z_b.detach().float().requires_grad_()
    loss = NTXentLoss(tau)(za, zb, queue.float() if queue is not None else None)
    ga, gb = torch.autograd.grad(loss, [za, zb])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(ga.double(), ref_ga, rtol=1e-4, atol=1e-6)
    assert torch.allclose(gb.double(), ref_gb, rtol=1e-4, atol=1e-6)


def brute_force_ntxent_keys(z_a, z_b, k_a, k_b, tau, queue):
    """The keys variant as a double loop in float64: anchor i against key p(i), all keys but its own
    view's, and the queue."""
    unit = lambda x: x.double() / x.double().norm(dim=1, keepdim=True)
    z, k, q = unit(torch.cat([z_a, z_b])), unit(torch.cat([k_a, k_b])), unit(queue)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        denom = sum(torch.exp(z[i] @ k[j] / tau) for j in range(n2) if j != i)
        denom = denom + sum(torch.exp(z[i] @ q[j] / tau) for j in range(q.shape[0]))
        total = total - torch.log(torch.exp(z[i] @ k[(i + n2 // 2) % n2] / tau) / denom)
    return total / n2


def test_ntxent_with_keys_matches_brute_force_and_keys_get_no_gradient():
    g = torch.Generator().manual_seed(1)
    z_a, z_b, k_a, k_b = (torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    queue = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ref = brute_force_ntxent_keys(z_a, z_b, k_a, k_b, 0.5, queue)
    ref_ga, ref_gb = torch.autograd.grad(ref, [z_a, z_b])
    za, zb, ka, kb = (t.detach().float().requires_grad_() for t in (z_a, z_b, k_a, k_b))
    loss = NTXentLoss(0.5)(za, zb, queue.float(), keys=(ka, kb))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    ga, gb = torch.autograd.grad(loss, [za, zb])
    assert torch.allclose(ga.double(), ref_ga, rtol=1e-4, atol=1e-6)
    assert torch.allclose(gb.double(), ref_gb, rtol=1e-4, atol=1e-6)
    # keys are targets: no gradient reaches them
    loss = NTXentLoss(0.5)(za, zb, queue.float(), keys=(ka, kb))
    assert loss.grad_fn is not None and torch.autograd.grad(loss, [ka], allow_unused=True)[0] is None
    # keys equal to the anchors give the plain loss
    same = NTXentLoss(0.5)(za, zb, queue.float(), keys=(za, zb))
    assert same.item() == pytest.approx(brute_force_ntxent(z_a, z_b, 0.5, queue).item(), rel=1e-5)
    with pytest.raises(ValueError, match="keys"):
        NTXentLoss(0.5)(za, zb, keys=(ka[:3], kb))


def test_ntxent_perfect_alignment_beats_random():
    z = torch.randn(16, 8)
    loss = NTXentLoss(0.1)
    assert loss(z, z) < loss(z, torch.randn(16, 8))
    # two identical well-separated one-hot views: only the positive survives at low temperature
    eye = torch.eye(8)
    assert loss(eye, eye).item() < 1e-3 * 50  # exp(-10)-scale negatives


def test_ntxent_rejects_bad_temperature_and_shapes():
    with pytest.raises(ValueError, match="NTXentLoss: temperature"):  # the library's own names (the CLI: --temperature)
        NTXentLoss(0.0)
    with pytest.raises(ValueError):
        NTXentLoss(0.1)(torch.randn(4, 3), torch.randn(5, 3))


def brute_force_distill(s, t, labels, tau, alpha):
    s, t = s.double(), t.double()
    n, c = s.shape
    kl = 0.0
    for i in range(n):
        zt = sum(math.exp(t[i, y].item() / tau) for y in range(c))
        log_zs = torch.log(sum(torch.exp(s[i, y] / tau) for y in range(c)))
        for y in range(c):
            kl = kl - math.exp(t[i, y].item() / tau) / zt * (s[i, y] / tau - log_zs)
    kl = kl / n
    if alpha == 1.0:
        return kl
    ce, m = 0.0, 0
    for i in range(n):
        if labels[i] >= 0:
            ce = ce - (s[i, labels[i]] - torch.log(torch.exp(s[i]).sum()))
            m += 1
    return (1 - alpha) * ce / m + alpha * kl


@pytest.mark.parametrize("tau,alpha", [(0.1, 1.0), (1.0, 1.0), (1.0, 0.3), (0.5, 0.0)])
def test_distillation_matches_brute_force(tau, alpha):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, -1, 2, -1])
    ref = brute_force_distill(s, t, labels, tau, alpha)
    (ref_g,) = torch.autograd.grad(ref, [s])
    sf = s.detach().float().requires_grad_()
    tf = t.float().requires_grad_()
    loss = DistillationLoss(tau, alpha)(sf, tf, labels)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(sf.grad.double(), ref_g, rtol=1e-4, atol=1e-6)
    assert tf.grad is None  # the teacher is fixed


def test_distillation_minimised_by_teacher_distribution():
    t = torch.randn(3, 5)
    loss = DistillationLoss(1.0)
    assert loss(t, t) < loss(t + torch.randn(3, 5), t)
