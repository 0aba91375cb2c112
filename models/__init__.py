"""NAT-family models registered with timm's registry.

Importing this package registers ``nat_*``, ``dinat_*``, ``dinat_s_*``, ``*_isotropic_*`` and ``vitrpb_*`` with
timm, so ``timm.create_model("nat_tiny.in1k", pretrained=True)`` and ``timm.list_models("*nat*")`` work. A new
family is one more module here, imported below; :func:`registered_models` finds its models by the module that
registered them, so the generated ``model=<variant>`` configs, ``hubconf.py`` and the tests pick it up.
:func:`load_weights` is the one function every weight-loading route goes through (docs/models.md).
"""

if __name__ != "natzoo.models":
    # The folder is the subpackage natzoo.models; imported under a second name it would register everything twice.
    raise ImportError(
        f"this is the package `natzoo.models`; import it as `natzoo.models` (it was imported as {__name__!r}, probably "
        "because the repository root is on sys.path)"
    )

from ._base import NATBase
from ._weights import (
    CHECKPOINT_SHA256,
    WEIGHT_FILES,
    LoadReport,
    check_folder_weights,
    damaged_weights,
    load_weights,
    pretrained_file,
    read_state_dict,
    resize_rpb,
    sha256_file,
    unwrap_state_dict,
)
from .dinat_s import DiNATs
from .flops import count_macs
from .isotropic import IsotropicNAT, RelPosAttention, RelPosBlock
from .nat import NAT, ConvDownsampler, ConvTokenizer, NATBlock, NATStage, convert_hf_state_dict, is_hf_state_dict


def registered_models() -> list[str]:
    """Names of the models this package registers with timm, sorted as ``timm.list_models`` sorts them.

    timm's registry keeps each model's entry point; the ones defined in a module of this package are ours, whatever
    their names (timm itself records only the last part of the module name, which a timm module could share).
    """
    import timm

    return [n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith(__name__ + ".")]


__all__ = [
    "CHECKPOINT_SHA256",
    "NAT",
    "ConvDownsampler",
    "ConvTokenizer",
    "DiNATs",
    "IsotropicNAT",
    "LoadReport",
    "NATBase",
    "NATBlock",
    "NATStage",
    "RelPosAttention",
    "RelPosBlock",
    "convert_hf_state_dict",
    "WEIGHT_FILES",
    "check_folder_weights",
    "count_macs",
    "damaged_weights",
    "is_hf_state_dict",
    "load_weights",
    "pretrained_file",
    "read_state_dict",
    "registered_models",
    "resize_rpb",
    "sha256_file",
    "unwrap_state_dict",
]
