"""natzoo's additions to Hydra: the generated ``model=<variant>`` configs and the resolvers of the run directory.

``train.py`` and ``eval.py`` call :func:`register_with_hydra` on import, and :func:`natzoo.testing.compose_config`
before it composes, so the command line and the tests see the same config groups.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from natzoo.checkpoints import run_dir_of_checkpoint
from natzoo.run.rundir import claim_fresh_dir

__all__ = ["register_with_hydra"]


def _run_dir(ckpt_path: str | None, resume_dir: str, fresh_dir: str) -> str:
    found = run_dir_of_checkpoint(ckpt_path, resume_dir)
    return str(found) if found is not None else claim_fresh_dir(fresh_dir)


def _output_subdir(ckpt_path: str | None, resume_dir: str, timestamp: str) -> str:
    # A resumed run keeps the first part's Hydra record and writes its own next to it.
    return ".hydra" if run_dir_of_checkpoint(ckpt_path, resume_dir) is None else f".hydra/resumed_{timestamp}"


def _fresh_dir(candidate: str) -> str:
    return claim_fresh_dir(candidate)


def register_with_hydra() -> None:
    """Registers natzoo's additions to Hydra; call before Hydra composes (``train.py``/``eval.py`` do so on import).

    * One ``model=<variant>`` config per model this package registers with timm
      (:func:`natzoo.models.registered_models`) in Hydra's ConfigStore: each is ``configs/model/timm.yaml`` with
      ``name: <variant>``, so the architecture and its defaults (drop path, ...) come from the registered variant and
      the config overrides only what the user changes.
    * The resolvers ``natzoo_run_dir`` and ``natzoo_output_subdir`` of ``configs/hydra/train.yaml``: a run resumed
      with ``ckpt_path=`` continues in the run directory that wrote the checkpoint; a fresh run gets a directory of
      its own (``natzoo_fresh_dir``, also in ``configs/hydra/default.yaml``; see :mod:`natzoo.run.rundir`).
    """
    from hydra.core.config_store import ConfigStore

    from natzoo.models import registered_models

    store = ConfigStore.instance()
    for name in registered_models():
        store.store(group="model", name=name, node={"defaults": ["timm"], "name": name})
    for name, function in (("natzoo_run_dir", _run_dir), ("natzoo_output_subdir", _output_subdir),
                           ("natzoo_fresh_dir", _fresh_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
