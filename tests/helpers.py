"""Helpers shared by several test files (conftest puts tests/ on sys.path).

Import the fixture into a test module to apply it there: ``from helpers import one_thread  # noqa: F401``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for the importing module: its tensors are tiny and OpenMP hand-offs dominate on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_HF_BLOCK = {
    "norm1.": "layernorm_before.",
    "attn.rpb": "attention.self.rpb",
    "attn.proj.": "attention.output.dense.",
    "norm2.": "layernorm_after.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}


def official_to_hf(state_dict: dict, prefix: str) -> dict:
    """Official NAT/DiNAT keys -> the HF transformers layout, written independently of the project's converter.

    Renames every module, splits ``attn.qkv`` into query/key/value and stacks ``gamma1``/``gamma2`` into
    ``layer_scale_parameters``; `prefix` is ``"nat"`` or ``"dinat"``. An unknown key fails the test.
    """
    out, gammas = {}, {}
    for key, value in state_dict.items():
        block = re.match(r"^levels\.(\d+)\.blocks\.(\d+)\.(.+)$", key)
        if block:
            base = f"{prefix}.encoder.levels.{block.group(1)}.layers.{block.group(2)}."
            rest = block.group(3)
            if rest.startswith("attn.qkv."):
                kind = rest.split(".")[-1]
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{base}attention.self.{name}.{kind}"] = part.clone()
            elif rest in ("gamma1", "gamma2"):
                gammas.setdefault(base, {})[rest] = value
            else:
                official = next(o for o in _HF_BLOCK if rest.startswith(o))
                out[base + _HF_BLOCK[official] + rest[len(official):]] = value.clone()
        elif key.startswith("patch_embed.proj."):
            out[f"{prefix}.embeddings.patch_embeddings.projection." + key[len("patch_embed.proj."):]] = value.clone()
        elif key.startswith("patch_embed.norm."):
            out[f"{prefix}.embeddings.norm." + key[len("patch_embed.norm."):]] = value.clone()
        elif key.startswith("levels."):
            out[f"{prefix}.encoder." + key] = value.clone()
        elif key.startswith("norm."):
            out[f"{prefix}.layernorm." + key[len("norm."):]] = value.clone()
        elif key.startswith("head."):
            out["classifier." + key[len("head."):]] = value.clone()
        else:
            raise AssertionError(f"unmapped key {key}")
    for base, pair in gammas.items():
        out[base + "layer_scale_parameters"] = torch.stack([pair["gamma1"], pair["gamma2"]])
    return out


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values in every parameter (layer-scale gammas and biases included), in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def fenced_blocks(languages: str) -> Iterator[tuple[Path, int, str, str]]:
    """``(file, first code line, code, the line before the fence)`` of every block of README.md and docs/*.md whose
    fence names one of `languages` (a regex alternation such as ``"python"`` or ``"bash|sh"``)."""
    fence = re.compile(rf"^```(?:{languages})[^\n]*\n(.*?)^```", re.S | re.M)
    for path in DOCS:
        text = path.read_text()
        for match in fence.finditer(text):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            yield path, text.count("\n", 0, match.start()) + 2, match.group(1), before
