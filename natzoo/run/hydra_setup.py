"""natzoo's additions to Hydra: the generated ``model=<variant>`` configs, the resolvers of the run directory, a
user's ``--config-dir`` ahead of natzoo's own configs, and the config a command line composed before its ``++``
overrides.

``train.py`` and ``eval.py`` call :func:`register_with_hydra` on import, and :func:`natzoo.testing.compose_config`
before it composes, so the command line and the tests see the same config groups.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from natzoo.checkpoints import run_dir_of_checkpoint
from natzoo.run.rundir import claim_fresh_dir, claim_record_dir

__all__ = ["PACKAGED_CONFIGS", "compose_before_overrides", "config_file", "register_with_hydra", "user_configs_first"]

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # natzoo's own configs (a link in a checkout)

# True while compose_before_overrides composes a second time: the run directory's resolvers then name the directory
# without creating it (the run has its own already).
_NAMING_ONLY = False


def _run_dir(ckpt_path: str | None, resume_dir: str, fresh_dir: str) -> str:
    found = run_dir_of_checkpoint(ckpt_path, resume_dir)
    return str(found) if found is not None else _fresh_dir(fresh_dir)


def _output_subdir(ckpt_path: str | None, resume_dir: str, timestamp: str) -> str:
    # A resumed run keeps the first part's Hydra record and writes its own next to it, in a folder it claims.
    found = run_dir_of_checkpoint(ckpt_path, resume_dir)
    if found is None:
        return ".hydra"
    return f"resumed_{timestamp}" if _NAMING_ONLY else claim_record_dir(found, f"resumed_{timestamp}")


def _fresh_dir(candidate: str) -> str:
    return candidate if _NAMING_ONLY else claim_fresh_dir(candidate)


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


def user_configs_first(argv: Sequence[str], packaged: str | os.PathLike[str]) -> list[str]:
    """The command line ``argv`` (without the program name) rewritten so that a user's ``--config-dir`` folder comes
    before natzoo's own configs (``packaged``) in Hydra's search path: a user file of the same name as one of natzoo's
    (``data/folder.yaml``, ``experiment/nat_tiny_in1k.yaml``) is the one used.

    Hydra searches ``--config-dir`` after the primary config folder, natzoo's. With a user folder, that folder becomes
    the primary one (``--config-path``) and natzoo's configs the additional one (``--config-dir``), both Hydra's own
    options: ``train.yaml``/``eval.yaml`` and every group natzoo ships are still found, and a user config still
    extends natzoo's by name (``defaults: [folder]``) unless the user folder has a file of that name itself.

    Unchanged: a command line without ``--config-dir``, one that sets ``--config-path`` itself, one whose
    ``--config-dir`` is not a folder (Hydra reports it) and one Hydra cannot parse (Hydra reports it).
    """
    from hydra._internal.utils import get_args_parser

    words = list(argv)
    parser = get_args_parser()

    def parse(line: list[str]) -> argparse.Namespace | None:
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # Hydra's own parse reports a bad command line
                return parser.parse_args(line)
        except SystemExit:
            return None

    given = parse(words)
    if given is None or given.config_dir is None or given.config_path is not None \
            or not os.path.isdir(given.config_dir):
        return words
    user, natzoo = os.path.abspath(given.config_dir), os.path.abspath(packaged)
    # The last --config-dir is the one argparse keeps, so natzoo's goes at the end.
    rewritten = ["--config-path", user, *words, "--config-dir", natzoo]
    check = parse(rewritten)
    if check is None or (check.config_path, check.config_dir, check.overrides) != (user, natzoo, given.overrides):
        return words
    return rewritten


def config_file(group_file: str) -> Path | None:
    """The file ``<group>/<name>.yaml`` (``group_file``) the running command's config search path finds first (a
    user's ``--config-dir`` folder before natzoo's configs), or natzoo's own outside a Hydra run; None: not a file
    of any folder on the path."""
    from hydra.core.hydra_config import HydraConfig

    folders = [PACKAGED_CONFIGS]
    if HydraConfig.initialized():
        folders = [Path(source.path) for source in HydraConfig.get().runtime.config_sources
                   if source.schema == "file"] + folders
    return next((folder / group_file for folder in folders if (folder / group_file).is_file()), None)


@contextlib.contextmanager
def _naming_only() -> Iterator[None]:
    global _NAMING_ONLY
    before, _NAMING_ONLY = _NAMING_ONLY, True
    try:
        yield
    finally:
        _NAMING_ONLY = before


def compose_before_overrides(dropped: Sequence[str]) -> DictConfig | None:
    """The config the running command composes without the overrides ``dropped`` (command-line words of
    ``HydraConfig``'s record), from the same config folders, unresolved: whether a ``++key`` sets a key the config
    has or adds one (:func:`natzoo.run.training.check_added_keys`). The run directory's resolvers only name their
    directories meanwhile. The ``hydra`` node is included. None outside a Hydra run.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    record = HydraConfig.get()
    search_path = ConfigSearchPathImpl()
    for source in record.runtime.config_sources:  # in order, the hydra.searchpath entries included
        search_path.append(source.provider, f"{source.schema}://{source.path}")
    skipped = set(dropped)
    overrides = [o for o in record.overrides.task if o not in skipped]
    with _naming_only():
        cfg = ConfigLoaderImpl(config_search_path=search_path).load_configuration(
            record.job.config_name, overrides, RunMode.RUN, validate_sweep_overrides=False)
    return cfg
