"""A new model family is one file plus its config, and then it is everywhere: registered_models(), the generated
`model=<variant>` configs, hubconf.py, the model tests' parameter lists, and a training run (docs/architecture.md,
"Where a change goes").

The toy family (tests/toy_family/toy.py) is loaded as `natzoo.models.toy`, the module a file `models/toy.py` becomes,
in a child process, so timm's registry and Hydra's ConfigStore of this process stay as they are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = Path(__file__).resolve().parent / "toy_family"

CHILD = r"""
import importlib, importlib.util, json, sys
from pathlib import Path

import torch

import natzoo.models

before = natzoo.models.registered_models()
spec = importlib.util.spec_from_file_location("natzoo.models.toy", sys.argv[1])
toy = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = toy
spec.loader.exec_module(toy)
found = {"before": before, "after": natzoo.models.registered_models()}

hubconf = importlib.import_module("hubconf")
found["hub"] = list(hubconf.toy_tiny(num_classes=3)(torch.zeros(2, 3, 32, 32)).shape)

sys.path.insert(0, "tests")
found["test_lists"] = {name: "toy_tiny" in importlib.import_module(name).ALL
                       for name in ("test_models_zoo", "test_models_timm")}

from natzoo import train
from natzoo.rules import plain
from natzoo.testing import compose_config

found["model_config"] = plain(compose_config("train", ["model=toy_tiny"]).model)
work = Path(sys.argv[3])
cfg = compose_config("train", [
    "experiment=toy_demo", f"hydra.searchpath=[file://{sys.argv[2]}]", f"data.root={work / 'data'}",
    "data.generate.train_per_class=4", "data.generate.val_per_class=2", "data.batch_size=8", "logger=csv",
    "callbacks=none", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
    f"paths.log_dir={work / 'logs'}",
], work / "run")
result = train(cfg)
state = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
found["trained"] = {"model_name": state["hyper_parameters"]["model_name"],
                    "embed_dim": state["hyper_parameters"]["model_kwargs"]["embed_dim"],
                    "head": list(state["state_dict"]["model.head.weight"].shape)}
print("FOUND " + json.dumps(found))
"""


@pytest.mark.slow  # a child process that imports the stack and trains for an epoch
def test_a_new_family_in_one_file_and_its_config_appears_everywhere(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(TOY / "toy.py"), str(TOY / "configs"), str(tmp_path)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.split("FOUND ", 1)[1])
    assert "toy_tiny" not in found["before"]
    assert sorted(set(found["after"]) - set(found["before"])) == ["toy_tiny"]
    assert found["hub"] == [2, 3]
    assert found["test_lists"] == {"test_models_zoo": True, "test_models_timm": True}
    assert found["model_config"] == {"name": "toy_tiny", "kwargs": {}, "drop_path_rate": None, "freeze": [],
                                     "grad_checkpointing": False, "pretrained": False, "pretrained_cfg_overlay": {}}
    # Trained through the toy's own config: its variant, its width, and a head for the 8 demo classes.
    assert found["trained"] == {"model_name": "toy_tiny", "embed_dim": 4, "head": [8, 4]}
