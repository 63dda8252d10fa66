"""The fast step computes what the straightforward one does: the input's features from a no-graph
pass or the cache give the same loss and gradients as one VGG pass over [x, x̂] (the code before)."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from model.batches import BatchSampler
from model.config import AugmentConfig
from model.dpa import DPA
from model.networks import fade
from model.progressive import Stage, downsample, stage_input
from model.trainer import Trainer, TrainingDiverged
from tests.model_core.conftest import blob_images, tiny_config


def concatenated_stage_loss(dpa: DPA, x: torch.Tensor, stage: Stage, alpha: float | None) -> torch.Tensor:
    """The stage loss as computed before: `perceptual(x, x̂)` runs VGG over x and x̂ in one graph."""
    x_res = stage_input(x, stage.res, alpha)
    x_hat = dpa.reconstruct(x_res, stage.res, alpha)
    loss = dpa.perceptual(x_res, x_hat, dpa.cfg.loss.layers_at(stage.res))
    if alpha is not None and dpa.cfg.train.smooth_pg_loss:
        half = stage.res // 2
        low = dpa.perceptual(downsample(x_res, half), downsample(x_hat, half), dpa.cfg.loss.layers_at(half))
        loss = fade(low, loss, alpha)
    return loss.mean()


def _loss_and_grads(dpa: DPA, loss: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in dpa.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.item(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


CASES = {
    "stab": (tiny_config(res=16, initial_res=8, stab_iters=2, trns_iters=4), 16, Stage("stab", 8, 2), 1, True),
    "transition": (tiny_config(res=16, initial_res=8, stab_iters=2, trns_iters=4), 16, Stage("trns", 16, 4), 1, True),
    "random_crop": (
        tiny_config(res=16, augment={"random_crop": True, "hflip": True, "vflip": True}), 24, Stage("stab", 16, 4), None, False
    ),
    "frozen_crop": (
        tiny_config(res=16, initial_res=8, stab_iters=2, trns_iters=4,
                    augment={"random_crop": True, "hflip": True, "vflip": True, "frozen": True}),
        24, Stage("trns", 16, 4), 1, True,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_step_has_the_same_loss_and_gradients(case) -> None:
    cfg, stored, stage, step, uses_cache = CASES[case]
    trainer = Trainer(cfg, blob_images(24, stored, seed=3), progress=False)
    trainer.step_in_stage = step or 0
    idx, x = trainer._batch()
    cached = trainer._cached(stage, idx)
    assert bool(cached) is uses_cache
    alpha = trainer._alpha(stage)
    fast = _loss_and_grads(trainer.dpa, trainer.dpa.stage_loss(x, stage, alpha, cached))
    slow = _loss_and_grads(trainer.dpa, concatenated_stage_loss(trainer.dpa, x, stage, stage.alpha(step or 0)))
    assert fast[0] == pytest.approx(slow[0], rel=1e-6)
    for g_fast, g_slow in zip(fast[1], slow[1]):
        # float32 sums in another order: agree to 1e-5 of the layer's largest gradient
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-5 * float(g_slow.abs().max()) + 1e-12)
    no_graph = _loss_and_grads(trainer.dpa, trainer.dpa.stage_loss(x, stage, alpha))  # the cache-free path
    assert no_graph[0] == pytest.approx(slow[0], rel=1e-6)


def test_cache_over_budget_falls_back_to_the_no_graph_pass(caplog) -> None:
    cfg = tiny_config(res=16, feature_cache_mb=1)  # 24 images × 64 ch × 16² × 4 B = 1.5 MiB
    trainer = Trainer(cfg, blob_images(24, 16, seed=0), progress=False)
    with caplog.at_level(logging.WARNING, logger="model.feature_cache"):
        trainer.fit()
    assert "needs 2 MiB > train.feature_cache_mb=1" in caplog.text
    assert trainer.cache.features is None


def test_the_cache_is_not_built_for_random_inputs() -> None:
    cfg = tiny_config(res=16, augment={"hflip": True})
    assert Trainer(cfg, blob_images(24, 16, seed=0), progress=False).cache is None


def test_a_diverging_loss_stops_training_naming_iteration_and_learning_rate() -> None:
    cfg = tiny_config(res=16, lr=1e6, stab_iters=40, log_every=10)
    with pytest.raises(TrainingDiverged, match=r"at iteration (10|20|30|40)/40 .*train\.lr=1000000\.0"):
        Trainer(cfg, blob_images(24, 16, seed=0), progress=False).fit()


def crops_per_image(augment: AugmentConfig, draws: int = 12) -> dict[int, set[tuple[int, ...]]]:
    """Every (top, left, hflip, vflip) each of 10 images 24 px wide got over `draws` batches of 5 (16 px crops)."""
    sampler = BatchSampler(torch.Size([10, 1, 24, 24]), 5, 16, augment, torch.Generator().manual_seed(0), torch.device("cpu"))
    seen: dict[int, set[tuple[int, ...]]] = {}
    for _ in range(draws):
        idx, batch = sampler.next()
        for j, image in enumerate(idx.tolist()):
            seen.setdefault(image, set()).add(tuple(int(batch[k][j]) for k in ("top", "left", "hflip", "vflip")))
    return seen


def test_frozen_augmentation_gives_an_image_the_same_crop_at_every_draw() -> None:
    random = AugmentConfig(random_crop=True, hflip=True, vflip=True)
    frozen = crops_per_image(random.model_copy(update={"frozen": True}))
    assert len(frozen) == 10 and all(len(crops) == 1 for crops in frozen.values())  # 6 epochs, one crop each
    assert len({crop for crops in frozen.values() for crop in crops}) > 1  # a seeded draw per image, not one for all
    assert any(len(crops) > 1 for crops in crops_per_image(random).values())


@pytest.mark.parametrize("frozen", [False, True], ids=["random", "frozen"])
def test_resume_is_exact_with_random_crops_and_flips(tmp_path, frozen: bool) -> None:
    """The per-epoch plan of indices and augmentation draws is part of the checkpoint."""
    cfg = tiny_config(res=16, stab_iters=8, augment={"random_crop": True, "hflip": True, "vflip": True, "frozen": frozen})
    images = blob_images(20, 20, seed=1)  # 2 full batches per epoch: the run crosses epoch boundaries
    full = Trainer(cfg, images, progress=False).fit()
    Trainer(cfg, images, checkpoint_dir=tmp_path, progress=False).fit(until=3)
    torch.manual_seed(7)
    resumed = Trainer(cfg, images, checkpoint_dir=tmp_path, progress=False).fit()
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.fixture(scope="module")
def eager_tiny_model() -> dict[str, torch.Tensor]:
    """The weights eager training gives the tiny 8×8 run the compile tests compare against."""
    return Trainer(tiny_config(res=8, stab_iters=3, device="cpu"), blob_images(24, 8, seed=0), progress=False).fit().state_dict()


def test_compiled_training_matches_eager(eager_tiny_model) -> None:
    """train.compile (inductor; C++ kernels on CPU) trains the eager model to float32 rounding, without falling back."""
    counters.clear()
    trainer = Trainer(tiny_config(res=8, stab_iters=3, device="cpu", compile=True), blob_images(24, 8, seed=0), progress=False)
    compiled = trainer.fit().state_dict()
    assert trainer._compiled_loss is not None and counters["stats"]["unique_graphs"] >= 1
    for key, value in eager_tiny_model.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-5, atol=1e-6, msg=key)


class _BackwardFails(torch.autograd.Function):
    """A compiled loss whose backward graph (compiled lazily, at the first backward) breaks halfway,
    after one parameter's gradient has been accumulated."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
        ctx.param = param
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> None:
        ctx.param.grad = torch.ones_like(ctx.param)
        raise RuntimeError("backward compilation failed")


def _breaking_compile(where: str):
    """A stand-in for torch.compile whose loss fails in the forward or halfway through the backward."""

    def compile_(fn, **kwargs):
        def loss_fn(*args):
            if where == "forward":
                raise RuntimeError("forward compilation failed")
            return _BackwardFails.apply(fn(*args), next(p for p in fn.__self__.parameters() if p.requires_grad))

        return loss_fn

    return compile_


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_failing_compiled_step_is_redone_eagerly(monkeypatch, caplog, eager_tiny_model, where: str) -> None:
    monkeypatch.setattr(torch, "compile", _breaking_compile(where))
    trainer = Trainer(tiny_config(res=8, stab_iters=3, device="cpu", compile=True), blob_images(24, 8, seed=0), progress=False)
    with caplog.at_level(logging.WARNING, logger="model.trainer"):
        fallen_back = trainer.fit().state_dict()
    assert f"the compiled step failed (RuntimeError: {where} compilation failed)" in caplog.text
    assert trainer._compiled_loss is None
    for key, value in eager_tiny_model.items():  # the failed step was redone from the same batch, grads cleared
        assert torch.equal(fallen_back[key], value), key
