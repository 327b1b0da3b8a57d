import torch

from esd_core.objective import esd_loss, esd_target


def test_target_matches_hand_computation():
    e0 = torch.tensor([1.0, 2.0, -1.0])
    ec = torch.tensor([3.0, 2.0, 0.0])
    # e0 - eta (ec - e0) with eta = 1: [1 - 2, 2 - 0, -1 - 1]
    assert torch.equal(esd_target(e0, ec, 1.0), torch.tensor([-1.0, 2.0, -2.0]))
    # eta = 0.5: [1 - 1, 2, -1 - 0.5]
    assert torch.equal(esd_target(e0, ec, 0.5), torch.tensor([0.0, 2.0, -1.5]))


def test_paper_eta_is_official_eta_minus_one():
    g = torch.Generator().manual_seed(0)
    e0, ec = torch.randn(2, 4, 8, 8, generator=g)
    for eta in (0.0, 1.0, 2.5):
        official = ec - (eta + 1.0) * (ec - e0)  # the official code's e_from - eta_code (e_c - e_0) with e_from = e_c
        torch.testing.assert_close(esd_target(e0, ec, eta), official)
        # and passing e_from = e_c explicitly is the same target
        torch.testing.assert_close(esd_target(e0, ec, eta, eps_from=ec), official)


def test_erase_from_uses_the_broader_concepts_prediction():
    e0, ec, ef = torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([5.0])
    assert torch.equal(esd_target(e0, ec, 1.0, eps_from=ef), torch.tensor([5.0 - 2.0 * 1.0]))


def test_target_and_loss_are_float32_for_low_precision_inputs():
    e0 = torch.randn(1, 4, 4, 4).to(torch.bfloat16)
    ec = torch.randn(1, 4, 4, 4).to(torch.bfloat16)
    target = esd_target(e0, ec, 1.0)
    assert target.dtype == torch.float32
    pred = torch.zeros_like(e0, requires_grad=True)
    loss = esd_loss(pred, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, (target ** 2).mean())
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
