"""NAT-family models registered with timm's registry.

Importing this package registers ``nat_*``, ``dinat_*``, ``dinat_s_*``, ``*_isotropic_*`` and ``vitrpb_*`` with
timm, so ``timm.create_model("nat_tiny.in1k", pretrained=True)`` and ``timm.list_models("*nat*")`` work.
"""

if __name__ != "natzoo.models":
    # The folder is the subpackage natzoo.models; imported under a second name it would register everything twice.
    raise ImportError(
        f"this is the package `natzoo.models`; import it as `natzoo.models` (it was imported as {__name__!r}, probably "
        "because the repository root is on sys.path)"
    )

from ._helpers import (
    CHECKPOINT_SHA256,
    check_state_dict,
    convert_hf_state_dict,
    filter_checkpoint,
    is_hf_state_dict,
    load_checkpoint_file,
    resize_rpb,
    sha256_file,
    unwrap_state_dict,
)
from .dinat_s import DiNATs
from .isotropic import IsotropicNAT, RelPosAttention, RelPosBlock
from .flops import count_macs
from .nat import NAT, ConvDownsampler, ConvTokenizer, NATBase, NATBlock, NATStage


def registered_models() -> list:
    """Names of the models this package registers with timm."""
    import timm

    return [
        n
        for n in timm.list_models(["*nat*", "vitrpb*"])
        if timm.models.model_entrypoint(n).__module__.startswith("natzoo.models.")
    ]


__all__ = [
    "NAT",
    "NATBase",
    "DiNATs",
    "IsotropicNAT",
    "RelPosAttention",
    "RelPosBlock",
    "NATBlock",
    "NATStage",
    "ConvTokenizer",
    "ConvDownsampler",
    "CHECKPOINT_SHA256",
    "check_state_dict",
    "count_macs",
    "registered_models",
    "sha256_file",
    "convert_hf_state_dict",
    "filter_checkpoint",
    "is_hf_state_dict",
    "load_checkpoint_file",
    "resize_rpb",
    "unwrap_state_dict",
]
