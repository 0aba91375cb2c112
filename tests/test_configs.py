"""The Hydra configs compose, name every registered variant without restating its defaults, and encode the published
recipes; the schedules and the weight-decay rule against independent references."""

from __future__ import annotations

import pytest
import timm
import torch
from natzoo.models import registered_models
from timm.layers import DropPath
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

from natzoo.classification.module import create_model
from natzoo.classification.task import image_config
from natzoo.config import CLASSIFICATION_RULES, COMMON_RULES, DETECTION_RULES, plain
from natzoo.datasets.folder import BAD_IMAGE_POLICIES
from natzoo.detection.detectors import ARCHITECTURES
from natzoo.optim import MILESTONE_UNITS, SCHEDULES, build_lr_lambda, param_groups, scaled_lr
from natzoo.testing import CONFIG_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))

# Default drop path of every registered variant, from the official model definitions (NAT, DiNAT, DiNAT_s and
# isotropic repositories of SHI-Labs).
DROP_PATH = {
    "nat_mini": 0.2, "nat_tiny": 0.2, "nat_small": 0.3, "nat_base": 0.5,
    "dinat_mini": 0.2, "dinat_tiny": 0.2, "dinat_small": 0.3, "dinat_base": 0.5, "dinat_large": 0.35,
    "dinat_large_384": 0.35, "dinat_large_384_11x11": 0.35, "dinat_large_11x11": 0.2,
    "dinat_s_tiny": 0.2, "dinat_s_small": 0.3, "dinat_s_base": 0.5, "dinat_s_large": 0.35, "dinat_s_large_384": 0.35,
    "nat_isotropic_small": 0.1, "dinat_isotropic_small": 0.1, "vitrpb_small": 0.1,
    "nat_isotropic_base": 0.4, "dinat_isotropic_base": 0.4, "vitrpb_base": 0.4,
}


def _drop_path_of(model_cfg) -> float:
    """Largest stochastic-depth rate of the model the config builds (shapes only, on the meta device)."""
    with torch.device("meta"):
        model = create_model(model_cfg.name, 10, model_cfg.drop_path_rate, **plain(model_cfg.kwargs))
    return max(m.drop_prob for m in model.modules() if isinstance(m, DropPath))


def test_defaults_compose_for_train_and_eval(tmp_path):
    cfg = compose_config("train", output_dir=tmp_path)
    assert cfg.task == "classification" and cfg.data.name == "demo" and cfg.model.name == "nat_mini"
    assert cfg.model.kwargs.embed_dim == 32 and list(cfg.model.kwargs.num_heads) == [1, 2, 4, 8]  # head_dim 32
    assert cfg.model.drop_path_rate == 0.0 and cfg.optim.lr == 2e-3 and cfg.sched.epochs == 12
    ev = compose_config("eval", output_dir=tmp_path)
    assert ev.ckpt_path is None and ev.checkpoint is None and ev.random_weights is False


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name, tmp_path):
    from natzoo.run.tasks import available_tasks

    cfg = compose_config("train", [f"experiment={name}"], tmp_path)
    assert cfg.task in available_tasks() and cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.data.root and cfg.model.name


def test_every_trainer_config_composes(tmp_path):
    for name in ("cpu", "gpu", "ddp"):
        trainer = compose_config("train", [f"trainer={name}"], tmp_path).trainer
        assert trainer._target_ == "lightning.pytorch.Trainer" and trainer.gradient_clip_val == 5.0, name
    fsdp = compose_config("train", ["trainer=fsdp"], tmp_path).trainer.strategy
    assert fsdp._target_ == "natzoo.strategies.fsdp_strategy"
    assert list(fsdp.wrap_modules) == ["natzoo.models.nat.NATBlock"]
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
    assert o.no_decay_rpb is False and o.no_decay_1d is True  # the official run decayed rpb
    assert (s.name, s.epochs, s.cooldown_epochs, s.warmup_epochs, s.warmup_lr, s.min_lr) == (
        "cosine", 300, 10, 20, 1e-6, 5e-6)
    tt = d.train_transform
    assert (tt.auto_augment, tt.re_prob, tt.re_mode, tt.re_count) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    assert (tuple(tt.scale), tt.hflip, tt.vflip, tt.interpolation) == ((0.08, 1.0), 0.5, 0.0, "random")
    m = d.mixup
    assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, m.mode, m.label_smoothing) == (
        0.8, 1.0, 1.0, 0.5, "batch", 0.1)
    assert (t.gradient_clip_val, t.gradient_clip_algorithm, t.precision) == (5.0, "norm", "bf16-mixed")
    # Evaluation: bicubic resize of the short side to 224 / 0.875 = 256, centre crop 224 (from the model's config).
    image = image_config(plain(d), cfg.model.name)
    assert (image["img_size"], image["eval_transform"]["crop_pct"], image["eval_transform"]["interpolation"]) == (
        224, 0.875, "bicubic")
    assert cfg.model.name == "nat_tiny" and cfg.model.drop_path_rate is None and _drop_path_of(cfg.model) == 0.2
    assert cfg.ema.enabled is False and cfg.seed == 42


def test_dinat_large_384_ft_is_the_stored_config(tmp_path):
    cfg = compose_config("train", ["experiment=dinat_large_384_ft"], tmp_path)
    assert cfg.model.name == "dinat_large_384"
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.sched.name, cfg.sched.epochs) == (5e-5, 1e-10, "constant", 30)
    assert (cfg.sched.warmup_epochs, cfg.sched.cooldown_epochs, cfg.data.batch_size) == (0, 0, 64)
    assert (cfg.data.mixup.mixup_alpha, cfg.data.mixup.cutmix_alpha, cfg.data.mixup.label_smoothing) == (0.0, 0.0, 0.1)
    assert cfg.trainer.precision == "32-true"
    # 384 px with crop_pct 1.0, from the model's pretrained config rather than from overrides.
    image = image_config(plain(cfg.data), cfg.model.name)
    assert (image["img_size"], image["eval_transform"]["crop_pct"]) == (384, 1.0)


@pytest.mark.slow
def test_one_model_config_per_registered_variant_without_restated_defaults(tmp_path):
    names = registered_models()
    assert set(names) == set(DROP_PATH)
    for name in names:
        model = compose_config("train", [f"model={name}"], tmp_path).model
        assert model.name == name and model.drop_path_rate is None and not model.kwargs, name
        assert _drop_path_of(model) == pytest.approx(DROP_PATH[name]), name
    changed = compose_config("train", ["model=dinat_small", "model.drop_path_rate=0.1"], tmp_path).model
    assert _drop_path_of(changed) == pytest.approx(0.1)


def test_overrides_reach_the_config(tmp_path):
    cfg = compose_config("train", ["optim.lr=0.01", "data.batch_size=32", "+trainer.fast_dev_run=true"], tmp_path)
    assert cfg.optim.lr == 0.01 and cfg.data.batch_size == 32 and cfg.trainer.fast_dev_run is True


def test_cosine_schedule_matches_timm_scheduler():
    # Independent reference: timm's CosineLRScheduler stepped per iteration, warmup_prefix=False.
    base, warmup_lr, min_lr, warmup, total, cooldown = 1e-3, 1e-6, 5e-6, 20, 300, 10
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=base)
    ref = CosineLRScheduler(opt, t_initial=total, lr_min=min_lr, warmup_t=warmup, warmup_lr_init=warmup_lr,
                            warmup_prefix=False, cycle_limit=1, t_in_epochs=False)
    sched = {"name": "cosine", "epochs": total, "warmup_epochs": warmup, "warmup_lr": warmup_lr, "min_lr": min_lr}
    ours = build_lr_lambda(sched, base, epoch_steps=1)
    for step in range(total + cooldown):
        assert base * ours(step) == pytest.approx(ref._get_lr(step)[0], rel=1e-9, abs=1e-15), step
    assert base * ours(0) == pytest.approx(warmup_lr) and base * ours(total + cooldown - 1) == pytest.approx(min_lr)


def test_warmup_step_schedule_matches_timm_scheduler():
    # mmcv's linear warmup from ratio r is timm's warmup from r * lr; epoch milestones become step milestones. timm
    # applies a milestone m at step m - 1 (its documented convention), mmcv at the first step of epoch m: hence + 1.
    base, ratio, warmup, epoch_steps, milestones = 1e-4, 0.001, 50, 20, (27, 33)
    param = torch.nn.Parameter(torch.zeros(1))
    ref = MultiStepLRScheduler(torch.optim.AdamW([param], lr=base), decay_t=[m * epoch_steps + 1 for m in milestones],
                               decay_rate=0.1, warmup_t=warmup, warmup_lr_init=ratio * base, warmup_prefix=False,
                               t_in_epochs=False)
    sched = {"name": "warmup_step", "warmup_steps": warmup, "warmup_ratio": ratio, "milestones": list(milestones),
                 "milestone_unit": "epoch", "gamma": 0.1}
    ours = build_lr_lambda(sched, base, epoch_steps)
    for step in range(36 * epoch_steps):
        assert base * ours(step) == pytest.approx(ref._get_lr(step)[0], rel=1e-9), step


def test_lr_scaling_is_explicit():
    assert scaled_lr(1e-3, 1024, 1024, scale=True) == 1e-3  # the official total batch: same lr
    assert scaled_lr(1e-3, 512, 1024, scale=True) == 5e-4
    assert scaled_lr(1e-3, 512, 1024, scale=False) == 1e-3


def _exempt(groups: list[dict], model: torch.nn.Module) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [g for g in groups if g["weight_decay"] > 0]
    assert len(decayed) == 1 and decayed[0]["weight_decay"] == 0.05
    return {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}


def test_weight_decay_rule_uses_the_models_own_list():
    model = timm.create_model("nat_small", embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=4)
    names = {n for n, _ in model.named_parameters()}
    official = _exempt(param_groups(model, 0.05, no_decay_rpb=False), model)
    rpbs = {n for n in names if n.endswith(".rpb")}
    assert rpbs and not rpbs & official  # rpb decayed, as in the official run
    assert {n for n in names if n.endswith(".bias")} <= official
    assert {n for n in names if "gamma" in n} <= official and any("gamma" in n for n in official)
    assert {n for n in names if "norm" in n and n.endswith(".weight")} <= official
    assert not {n for n in official if n.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"))}
    assert _exempt(param_groups(model, 0.05, no_decay_rpb=True), model) == official | rpbs
    # The model's own list alone gives the same groups: it names every 1-D parameter.
    assert _exempt(param_groups(model, 0.05, no_decay_1d=False, no_decay_rpb=True), model) == official | rpbs


def test_weight_decay_rule_for_models_without_rpb_or_the_method():
    # A timm model whose no_weight_decay() takes no argument: its names (pos_embed, cls_token) are exempt too.
    vit = timm.create_model("test_vit", num_classes=4)
    exempt = _exempt(param_groups(vit, 0.05, no_decay_rpb=False), vit)
    assert {"pos_embed", "cls_token"} <= exempt and "patch_embed.proj.weight" not in exempt
    # A module without the method: timm's rule (1-D parameters and biases), plus name patterns.
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    assert _exempt(param_groups(net, 0.05), net) == {"0.bias", "1.weight", "1.bias", "2.bias"}
    assert _exempt(param_groups(net, 0.05, no_decay_1d=False, no_decay_names=["2.*"]), net) == {"2.weight", "2.bias"}


def test_choice_rules_take_their_options_from_the_code_that_owns_them():
    # The same objects, not restated copies: a schedule, detector or policy added there is accepted here.
    owners = {"sched.name": (COMMON_RULES, SCHEDULES), "sched.milestone_unit": (COMMON_RULES, MILESTONE_UNITS),
              "model.arch": (DETECTION_RULES, ARCHITECTURES), "data.bad_images": (CLASSIFICATION_RULES, BAD_IMAGE_POLICIES)}
    for key, (rules, options) in owners.items():
        assert rules[key].options is options, key


@pytest.mark.parametrize("overrides", [["debug=tiny"], ["debug=fdr"], ["debug=limit"], ["debug=[tiny,fdr]"]])
def test_debug_presets_compose_on_the_default_config(tmp_path, overrides):
    cfg = compose_config("train", overrides, tmp_path)
    names = overrides[0].removeprefix("debug=").strip("[]").split(",")
    if "tiny" in names:
        assert (cfg.data.generate.train_per_class, cfg.model.kwargs.depths, cfg.sched.epochs) == (8, [1, 1, 1, 1], 2)
        assert cfg.data.root.endswith("natzoo_demo_tiny") and list(cfg.logger) == ["csv"]
    if "fdr" in names:
        assert cfg.trainer.fast_dev_run is True
    if "limit" in names:
        assert (cfg.trainer.limit_train_batches, cfg.trainer.limit_val_batches) == (5, 2)
