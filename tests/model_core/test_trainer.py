"""Training: the PG schedule, exact resume, save/load, and that DPA actually detects anomalies."""

import pytest
import torch
from sklearn.metrics import roc_auc_score

from model.dpa import load_dpa, save_dpa
from model.progressive import Stage, stage_input, stage_schedule
from model.scoring import anomaly_maps, score_images
from model.trainer import StepInfo, Trainer, train_dpa
from tests.model_core.conftest import blob_images, tiny_config


def test_pg_stage_sequence_and_alpha_schedule() -> None:
    cfg = tiny_config(res=16, initial_res=4, stab_iters=2, trns_iters=3, iters_per_res={16: {"stab": 4}}, log_every=1)
    assert stage_schedule(cfg) == [
        Stage("stab", 4, 2), Stage("trns", 8, 3), Stage("stab", 8, 2), Stage("trns", 16, 3), Stage("stab", 16, 4),
    ]
    seen: list[StepInfo] = []
    train_dpa(cfg, blob_images(16, 16, seed=0), callbacks=[seen.append], progress=False)
    assert [(s.stage.kind, s.stage.res, s.alpha) for s in seen] == [
        ("stab", 4, None), ("stab", 4, None),
        ("trns", 8, 1 / 3), ("trns", 8, 2 / 3), ("trns", 8, 1.0),
        ("stab", 8, None), ("stab", 8, None),
        ("trns", 16, 1 / 3), ("trns", 16, 2 / 3), ("trns", 16, 1.0),
        ("stab", 16, None), ("stab", 16, None), ("stab", 16, None), ("stab", 16, None),
    ]
    assert [s.iteration for s in seen] == list(range(1, 15))


def test_without_pg_is_one_stable_stage() -> None:
    assert stage_schedule(tiny_config(res=16, stab_iters=7)) == [Stage("stab", 16, 7)]


def test_adam_is_recreated_at_every_stage() -> None:
    cfg = tiny_config(res=8, initial_res=4, stab_iters=2, trns_iters=2)
    trainer = Trainer(cfg, blob_images(8, 8, seed=0), progress=False)
    created_at = []
    make = trainer._new_optimizer
    trainer._new_optimizer = lambda: created_at.append(trainer.iteration) or make()
    trainer.fit()
    assert created_at == [0, 2, 4]  # stab@4, trns@8, stab@8: a fresh Adam (zeroed moments) per stage


def test_pg_input_fades_from_the_half_resolution() -> None:
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(stage_input(x, 8, None), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    # ×4 non-antialiased bilinear: the mean of the 2×2 central pixels of each 4×4 block, not of all 16
    central = (x[..., 1::4, 1::4] + x[..., 1::4, 2::4] + x[..., 2::4, 1::4] + x[..., 2::4, 2::4]) / 4
    low = torch.nn.functional.interpolate(central, scale_factor=2, mode="nearest")
    assert torch.allclose(stage_input(x, 8, 0.25), 0.75 * low + 0.25 * torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)


def _weights(dpa):
    return {k: v.clone() for k, v in dpa.state_dict().items()}


@pytest.mark.parametrize(
    ("initial_res", "stop_at"),
    [(None, 5), (4, 4), (4, 7)],  # without PG; with PG mid-transition (α state); with PG at a stage boundary
)
def test_train_2n_equals_train_n_stop_resume_n(tmp_path, initial_res, stop_at) -> None:
    cfg = tiny_config(res=16, initial_res=initial_res, stab_iters=2 if initial_res else 10, trns_iters=3,
                      iters_per_res={16: {"stab": 4}} if initial_res else {})
    images = blob_images(24, 16, seed=1)
    full = train_dpa(cfg, images, progress=False)

    Trainer(cfg, images, checkpoint_dir=tmp_path, progress=False).fit(until=stop_at)
    torch.manual_seed(999)  # whatever the global RNG does in between must not matter
    resumed = Trainer(cfg, images, checkpoint_dir=tmp_path, progress=False)
    assert resumed.iteration == stop_at
    result = resumed.fit()
    assert resumed.iteration == sum(s.iters for s in stage_schedule(cfg))
    a, b = _weights(full), _weights(result)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_of_another_config_is_refused(tmp_path) -> None:
    images = blob_images(8, 16, seed=0)
    Trainer(tiny_config(checkpoint_every=2), images, checkpoint_dir=tmp_path, progress=False).fit()
    with pytest.raises(ValueError, match="another configuration"):
        Trainer(tiny_config(checkpoint_every=2, lr=0.1), images, checkpoint_dir=tmp_path, progress=False)


def test_too_few_images_for_a_batch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(tiny_config(), blob_images(3, 16, seed=0), progress=False)


def test_save_load_roundtrip_gives_identical_scores(tmp_path) -> None:
    dpa = train_dpa(tiny_config(stab_iters=2), blob_images(8, 16, seed=0), progress=False)
    save_dpa(dpa, tmp_path / "dpa.pt")
    loaded = load_dpa(tmp_path / "dpa.pt")
    test = blob_images(5, 16, seed=3)
    assert torch.equal(score_images(dpa, test), score_images(loaded, test))
    assert loaded.vgg_source == "random:seed=0"
    maps = anomaly_maps(loaded, test)
    assert maps.shape == (5, 16, 16) and torch.all(maps >= 0)


def test_feature_stats_from_training_normals() -> None:
    cfg = tiny_config(stab_iters=1)
    cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"feature_stats": "train"})})
    trainer = Trainer(cfg, blob_images(16, 16, seed=0), progress=False)
    x = blob_images(16, 16, seed=0).float() / 127.5 - 1
    f = trainer.dpa.perceptual.features(x, ["r12"])["r12"]
    assert torch.allclose(trainer.dpa.perceptual.mean_r12.flatten(), f.mean(dim=(0, 2, 3)), atol=1e-4)


def test_detects_clear_anomalies_on_a_tiny_synthetic_task() -> None:
    cfg = tiny_config(res=16, stab_iters=120, batch_size=16, lr=3e-3)
    dpa = train_dpa(cfg, blob_images(128, 16, seed=0), progress=False)
    normal, anomalous = blob_images(40, 16, seed=10), blob_images(40, 16, seed=11, anomalous=True)
    scores = score_images(dpa, torch.cat([normal, anomalous]))
    auroc = roc_auc_score([0] * 40 + [1] * 40, scores.numpy())
    assert auroc > 0.9, auroc


def test_scores_and_maps_in_one_pass_equal_the_separate_calls() -> None:
    from model.scoring import scores_and_maps

    dpa = train_dpa(tiny_config(stab_iters=2), blob_images(8, 16, seed=0), progress=False)
    test = blob_images(5, 16, seed=3)
    scores, maps = scores_and_maps(dpa, test, batch_size=2)
    assert torch.equal(scores, score_images(dpa, test, batch_size=2))
    assert torch.equal(maps, anomaly_maps(dpa, test, batch_size=2))


def test_trainers_built_at_once_in_threads_get_their_seeds_weights() -> None:
    """Parallel seeds and benchmark cells build trainers in threads; each must get what its seed
    gives alone (the global RNG draws of two builds must not interleave)."""
    import threading

    configs = [tiny_config(res=16, seed=seed) for seed in (0, 1, 2, 3)]
    images = blob_images(8, 16, seed=0)
    alone = [_weights(Trainer(cfg, images, progress=False).dpa) for cfg in configs]
    start, together = threading.Barrier(len(configs)), [None] * len(configs)

    def build(i: int) -> None:
        start.wait()
        together[i] = _weights(Trainer(configs[i], images, progress=False).dpa)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(len(configs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mine, expected in zip(together, alone):
        assert mine.keys() == expected.keys() and all(torch.equal(mine[k], expected[k]) for k in expected)
