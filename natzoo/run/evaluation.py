"""``evaluate(cfg)``: the task-agnostic evaluation driver behind ``eval.py``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from natzoo.run.callbacks import Stopwatch
from natzoo.run.console import configure_console
from natzoo.run.rundir import write_atomically
from natzoo.run.tasks import Task
from natzoo.run.training import build_trainer, cpu_threads, run_directory

__all__ = ["run_evaluation"]


def _write_json(result: dict[str, Any], path: Path) -> None:
    write_atomically(path, lambda handle: handle.write(json.dumps(result, indent=2) + "\n"))


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates ``cfg.task`` on the validation split of ``cfg.data`` and writes ``cfg.output`` (JSON).

    The model comes from ``ckpt_path`` (a Lightning checkpoint), or from ``model`` plus ``checkpoint`` (official,
    HF or flat state-dict file), or from ``model`` with ``pretrained=true`` (timm's weights); a randomly initialised
    model only with ``random_weights=true``. Returns the result dict that is also written to the JSON file (metrics,
    throughput end to end and in the model steps, source, output paths).

    Raises:
        ValueError: no weights were given (and ``random_weights`` is false), or a config value is invalid.
    """
    configure_console()
    with run_directory(cfg, "eval", lock=False) as (task, _, output_dir), cpu_threads(cfg):
        return _evaluate(cfg, task, output_dir)


def _evaluate(cfg: DictConfig, task: Task, output_dir: Path) -> dict[str, Any]:
    datamodule = task.build_datamodule(cfg)
    module = task.load_module_for_eval(cfg, datamodule)
    if task.before_eval is not None:
        task.before_eval(cfg, module, datamodule)
    stopwatch = Stopwatch()
    trainer = build_trainer(cfg, [stopwatch], False, enable_checkpointing=False, max_epochs=1)
    start = time.perf_counter()
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    total_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in metrics.items()}
    timing = {
        "num_images": stopwatch.images,
        "images_per_second": stopwatch.images / stopwatch.seconds if stopwatch.seconds else None,
        "model_images_per_second": stopwatch.images / stopwatch.step_seconds if stopwatch.step_seconds else None,
    }

    if task.summarize_eval is not None:
        result = task.summarize_eval(cfg, module, datamodule, metrics, output_dir)
    else:
        result = dict(metrics)
    result.update({
        "task": task.name,
        "source": _source(cfg, module),
        "data_root": str(cfg.data.root),
        **timing,
        "wall_seconds": total_seconds,
        "device": str(module.device),
        "precision": str(trainer.precision),
    })
    path = Path(str(cfg.get("output") or output_dir / "eval.json"))
    result["output"] = str(path)
    if trainer.is_global_zero:
        _write_json(result, path)
        rank_zero_info(_summary_line(result))
    return result


def _source(cfg: DictConfig, module: Any) -> dict[str, Any]:
    """Where the weights came from: the file, the model they belong to (for a Lightning checkpoint the one it
    recorded) and whether the EMA copy was used."""
    hparams = getattr(module, "hparams", {}) or {}
    model = hparams.get("model_name") or (hparams.get("detector") or {}).get("backbone") or str(cfg.model.name)
    source: dict[str, Any] = {"model": str(model), "use_ema": bool(cfg.get("use_ema", False))}
    if cfg.get("ckpt_path"):
        return {"ckpt_path": str(cfg.ckpt_path), **source}
    return {**source, "checkpoint": str(cfg.checkpoint) if cfg.get("checkpoint") else None,
            "pretrained": bool(cfg.get("pretrained", False)), "random_weights": bool(cfg.get("random_weights", False))}


def _summary_line(result: dict[str, Any]) -> str:
    keys = ("top1", "top5", "bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50")
    parts = [f"{k}={result[k]:.2f}" for k in keys if isinstance(result.get(k), float)]
    if isinstance(result.get("loss"), float):
        parts.append(f"loss={result['loss']:.4f}")
    if result.get("images_per_second"):
        parts.append(f"{result['images_per_second']:.1f} images/s")
    written = [result["output"], *(result[k] for k in ("confusion_matrix_png",) if result.get(k))]
    return f"Evaluation: {', '.join(parts)}. Results written to {', '.join(map(str, written))}"
