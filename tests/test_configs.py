"""The Hydra configs compose, name every registered variant, and encode the published recipe (spec section 5)."""

from __future__ import annotations

import pytest
import timm
import torch
from omegaconf import OmegaConf
from timm.scheduler import CosineLRScheduler

from natzoo import models  # noqa: F401
from natzoo.optim import build_lr_lambda, param_groups_weight_decay, scaled_lr
from natzoo.testing import CONFIG_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))

# Spec 1.2 / 1.4 / 1.5: default drop path of every registered variant.
DROP_PATH = {
    "nat_mini": 0.2, "nat_tiny": 0.2, "nat_small": 0.3, "nat_base": 0.5,
    "dinat_mini": 0.2, "dinat_tiny": 0.2, "dinat_small": 0.3, "dinat_base": 0.5, "dinat_large": 0.35,
    "dinat_large_384": 0.35, "dinat_large_384_11x11": 0.35, "dinat_large_11x11": 0.2,
    "dinat_s_tiny": 0.2, "dinat_s_small": 0.3, "dinat_s_base": 0.5, "dinat_s_large": 0.35, "dinat_s_large_384": 0.35,
    "nat_isotropic_small": 0.1, "dinat_isotropic_small": 0.1, "vitrpb_small": 0.1,
    "nat_isotropic_base": 0.4, "dinat_isotropic_base": 0.4, "vitrpb_base": 0.4,
}


def test_defaults_compose_for_train_and_eval(tmp_path):
    cfg = compose_config("train", output_dir=tmp_path)
    assert cfg.task == "classification" and cfg.data.name == "demo" and cfg.model.name == "nat_mini"
    assert cfg.model.kwargs.embed_dim == 32 and list(cfg.model.kwargs.num_heads) == [1, 2, 4, 8]  # head_dim 32
    ev = compose_config("eval", output_dir=tmp_path)
    assert ev.ckpt_path is None and ev.checkpoint is None


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name, tmp_path):
    from natzoo.tasks import available_tasks

    cfg = compose_config("train", [f"experiment={name}"], tmp_path)
    assert cfg.task in available_tasks() and cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.data.root and cfg.model.name


def test_every_trainer_config_composes(tmp_path):
    for name in ("cpu", "gpu", "ddp"):
        trainer = compose_config("train", [f"trainer={name}"], tmp_path).trainer
        assert trainer._target_ == "lightning.pytorch.Trainer" and trainer.gradient_clip_val == 5.0, name
    fsdp = compose_config("train", ["trainer=fsdp"], tmp_path).trainer.strategy
    assert fsdp._target_ == "natzoo.strategies.fsdp_strategy" and list(fsdp.wrap_modules) == ["natzoo.models.nat.NATBlock"]
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = instantiate(fsdp)
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["auto_wrap_policy"] is not None
    multi = compose_config("train", ["trainer=multi_node"], tmp_path).trainer
    assert (multi.strategy, multi.num_nodes, multi.devices) == ("ddp", 2, 8)


def test_nat_tiny_in1k_is_the_published_recipe(tmp_path):
    cfg = compose_config("train", ["experiment=nat_tiny_in1k"], tmp_path)
    o, s, d, t = cfg.optim, cfg.sched, cfg.data, cfg.trainer
    assert (o.name, o.lr, o.weight_decay, tuple(o.betas), o.eps) == ("adamw", 1e-3, 0.05, (0.9, 0.999), 1e-8)
    assert o.scale_lr is False and o.lr_base_batch == 1024 and d.batch_size == 128  # 8 GPUs x 128 = 1024
    assert o.no_decay_rpb is False and o.no_decay_1d is True  # the official run decayed rpb (spec 5.3)
    assert (s.name, s.epochs, s.cooldown_epochs, s.warmup_epochs, s.warmup_lr, s.min_lr) == (
        "cosine", 300, 10, 20, 1e-6, 5e-6)
    tt = d.train_transform
    assert (tt.auto_augment, tt.re_prob, tt.re_mode, tt.re_count) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    assert (tuple(tt.scale), tt.hflip, tt.vflip, tt.interpolation) == ((0.08, 1.0), 0.5, 0.0, "random")
    m = d.mixup
    assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, m.mode, m.label_smoothing) == (
        0.8, 1.0, 1.0, 0.5, "batch", 0.1)
    assert (t.gradient_clip_val, t.gradient_clip_algorithm) == (5.0, "norm")
    assert (d.img_size, d.eval_transform.crop_pct, d.eval_transform.interpolation) == (224, 0.875, "bicubic")
    assert cfg.model.name == "nat_tiny" and cfg.model.drop_path_rate == 0.2
    assert cfg.ema.enabled is False and cfg.seed == 42


def test_dinat_large_384_ft_is_the_stored_config(tmp_path):
    cfg = compose_config("train", ["experiment=dinat_large_384_ft"], tmp_path)
    assert cfg.model.name == "dinat_large_384" and cfg.data.img_size == 384
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.sched.name, cfg.sched.epochs) == (5e-5, 1e-10, "constant", 30)
    assert (cfg.sched.warmup_epochs, cfg.sched.cooldown_epochs, cfg.data.batch_size) == (0, 0, 64)
    assert (cfg.data.mixup.mixup_alpha, cfg.data.mixup.cutmix_alpha, cfg.data.mixup.label_smoothing) == (0.0, 0.0, 0.1)
    assert cfg.data.eval_transform.crop_pct == 1.0 and cfg.trainer.precision == "32-true"


def test_one_model_config_per_registered_variant():
    families = {m for m in timm.list_models() if m.startswith(("nat_", "dinat_", "vitrpb_"))}
    files = {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")} - {"nat_demo", "timm"}
    files = {f for f in files if not f.startswith("detection")}  # the detection task's model configs
    assert files == families == set(DROP_PATH)
    for name in files:
        cfg = OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml")
        assert cfg.name == name and cfg.drop_path_rate == DROP_PATH[name], name
    assert compose_config("train", ["model=dinat_s_large"]).model.name == "dinat_s_large"


def test_overrides_and_sweep_syntax_work(tmp_path):
    cfg = compose_config("train", ["optim.lr=0.01", "data.batch_size=32", "+trainer.fast_dev_run=true"], tmp_path)
    assert cfg.optim.lr == 0.01 and cfg.data.batch_size == 32 and cfg.trainer.fast_dev_run is True
    # A multirun sweep is a list of such overrides per job (`python train.py -m optim.lr=1e-3,2e-3`).
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(["optim.lr=1e-3,2e-3", "seed=1,2"])
    jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    assert sorted(jobs) == sorted([["optim.lr=0.001", "seed=1"], ["optim.lr=0.001", "seed=2"],
                                   ["optim.lr=0.002", "seed=1"], ["optim.lr=0.002", "seed=2"]])
    assert compose_config("train", jobs[-1], tmp_path).seed in (1, 2)


def test_schedule_matches_timm_cosine_scheduler():
    # Independent reference: timm's CosineLRScheduler stepped per iteration, warmup_prefix=False (spec 5.1).
    base, warmup_lr, min_lr, warmup, total, cooldown = 1e-3, 1e-6, 5e-6, 20, 300, 10
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=base)
    ref = CosineLRScheduler(opt, t_initial=total, lr_min=min_lr, warmup_t=warmup, warmup_lr_init=warmup_lr,
                            warmup_prefix=False, cycle_limit=1, t_in_epochs=False)
    ours = build_lr_lambda("cosine", base, warmup_lr, min_lr, warmup, total)
    for step in range(total + cooldown):
        assert base * ours(step) == pytest.approx(ref._get_lr(step)[0], rel=1e-9, abs=1e-15), step
    assert base * ours(0) == pytest.approx(warmup_lr) and base * ours(total + cooldown - 1) == pytest.approx(min_lr)


def test_lr_scaling_is_explicit():
    assert scaled_lr(1e-3, 1024, 1024, scale=True) == 1e-3  # the official total batch: same lr
    assert scaled_lr(1e-3, 512, 1024, scale=True) == 5e-4
    assert scaled_lr(1e-3, 512, 1024, scale=False) == 1e-3


def test_weight_decay_groups_follow_spec_5_3():
    model = timm.create_model("nat_small", embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=4)
    names = {id(p): n for n, p in model.named_parameters()}

    def exempt(no_decay_rpb: bool) -> set[str]:
        groups = param_groups_weight_decay(model, 0.05, no_decay_rpb=no_decay_rpb)
        assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
        return {names[id(p)] for p in groups[1]["params"]}

    official = exempt(no_decay_rpb=False)
    rpbs = {n for n in names.values() if n.endswith(".rpb")}
    assert rpbs and not rpbs & official  # rpb decayed, as in the official run
    assert {n for n in names.values() if n.endswith(".bias")} <= official
    assert {n for n in names.values() if "gamma" in n} <= official and any("gamma" in n for n in official)
    assert {n for n in names.values() if "norm" in n and n.endswith(".weight")} <= official
    assert not {n for n in official if n.endswith("qkv.weight") or n.endswith("proj.weight") or "fc" in n
                and n.endswith(".weight")}
    assert exempt(no_decay_rpb=True) == official | rpbs
