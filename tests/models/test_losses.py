import pytest
import torch

from dynroute.models import BUDGETS, BudgetLoss, BudgetSchedule, budget, segmentation_loss


def test_budget_loss_is_zero_at_the_target_fraction_and_quadratic_around_it():
    loss = BudgetLoss(lambda2=0.8, mu=0.1, c_all=1000.0)
    at_target = torch.tensor([80.0, 120.0])  # batch mean 100 = μ·C_all
    assert loss(at_target, progress=1.0).item() == pytest.approx(0.0)
    assert loss(torch.tensor([300.0]), 1.0).item() == pytest.approx(0.8 * (0.3 - 0.1) ** 2)
    assert loss(torch.tensor([0.0]), 1.0).item() == pytest.approx(0.8 * 0.1**2)


def test_budget_loss_follows_its_schedule():
    schedule = BudgetSchedule()  # 0 until 40%, then ramps to 1 over 2%
    assert schedule(0.0) == schedule(0.399) == 0.0
    assert schedule(0.41) == pytest.approx(0.5)
    assert schedule(0.42) == pytest.approx(1.0) and schedule(0.9) == 1.0
    loss = BudgetLoss(lambda2=0.5, mu=0.2, c_all=10.0)
    e = torch.tensor([10.0])
    assert loss(e, 0.3).item() == 0.0
    assert loss(e, 0.41).item() == pytest.approx(0.5 * 0.5 * 0.8**2)
    assert loss(e, 0.6).item() == pytest.approx(0.5 * 0.8**2)
    custom = BudgetSchedule(start=0.1, ramp=0.0)
    assert custom(0.05) == 0.0 and custom(0.1) == 1.0


def test_budget_loss_gradient_pushes_the_cost_towards_the_target():
    e = torch.tensor([500.0], requires_grad=True)
    BudgetLoss(lambda2=1.0, mu=0.1, c_all=1000.0)(e, 1.0).backward()
    assert e.grad.item() > 0  # above budget: lowering E lowers the loss


def test_named_budgets_are_the_papers():
    assert (budget("dynamic-a").lambda2, budget("dynamic-a").mu) == (0.8, 0.1)
    assert (budget("dynamic-b").lambda2, budget("dynamic-b").mu) == (0.5, 0.1)
    assert (budget("dynamic-c").lambda2, budget("dynamic-c").mu) == (0.5, 0.2)
    assert budget("dynamic-raw").lambda2 == 0.0 and not budget("dynamic-raw").small_gate
    assert all(BUDGETS[n].small_gate for n in ("dynamic-a", "dynamic-b", "dynamic-c"))
    with pytest.raises(ValueError, match="dynamic-a"):
        budget("dynamic-z")


def test_budget_loss_rejects_meaningless_settings():
    with pytest.raises(ValueError, match="c_all"):
        BudgetLoss(lambda2=1.0, mu=0.1, c_all=0.0)
    with pytest.raises(ValueError, match="mu"):
        BudgetLoss(lambda2=1.0, mu=1.5, c_all=1.0)


def test_segmentation_loss_ignores_255():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 5.0
    targets = torch.tensor([[[1, 255], [255, 255]]])
    only_valid = segmentation_loss(logits, targets)
    first_pixel = segmentation_loss(logits[..., :1, :1], targets[..., :1, :1])
    torch.testing.assert_close(only_valid, first_pixel)
