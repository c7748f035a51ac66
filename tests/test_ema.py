import torch
from torch import nn

from utils import make_ema


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_ema_update_arithmetic_with_warmup_and_buffers():
    model = small_model()
    ema = make_ema(model, decay=0.999)
    ema.update_parameters(model)  # first update copies
    start_w = model[0].weight.detach().clone()
    start_rm = model[1].running_mean.clone()
    assert torch.equal(ema.module[0].weight, start_w)

    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()
    model(torch.randn(8, 4))  # moves BatchNorm running stats and its counter
    ema.update_parameters(model)

    d = min(0.999, (1 + 1) / (10 + 1))  # t = 1 update so far
    assert torch.allclose(ema.module[0].weight, d * start_w + (1 - d) * model[0].weight, atol=1e-6)
    assert torch.allclose(ema.module[1].running_mean, d * start_rm + (1 - d) * model[1].running_mean, atol=1e-6)
    assert ema.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 1
    assert int(ema.n_averaged) == 2


def test_ema_decay_reaches_its_ceiling():
    model = small_model()
    ema = make_ema(model, decay=0.5)
    for _ in range(30):
        ema.update_parameters(model)
    before = ema.module[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update_parameters(model)  # (1+30)/(10+30) > 0.5, so the decay is 0.5
    assert torch.allclose(ema.module[0].weight, 0.5 * before + 0.5 * model[0].weight, atol=1e-6)
