"""Which parameters train, at which learning rate, with which weight decay (docs/method.md 5).

Three roles: `frozen` (patch/position/token embeddings, ln_pre), `new` (modules
SegCLIP adds plus the vision blocks after the group module, ln_post and proj:
the large learning rate) and `pretrained` (everything else: early vision blocks,
text tower, logit scale: the small learning rate). Weight decay applies to all
but biases [ref].
"""

from __future__ import annotations

import re

from torch import nn

from segclip.config import TrainConfig
from segclip.model.segclip import SegCLIP

FROZEN_PATTERNS = (
    r"clip\.visual\.conv1\.",
    r"clip\.visual\.class_embedding$",
    r"clip\.visual\.positional_embedding$",
    r"clip\.visual\.ln_pre\.",
    r"clip\.token_embedding\.",
    r"clip\.positional_embedding$",
)
NEW_PATTERNS = (
    r"group\.",
    r"reconstruction\.",
    r"clip\.visual\.ln_post\.",
    r"clip\.visual\.proj$",
)
_LATE_BLOCK = re.compile(r"clip\.visual\.transformer\.resblocks\.(\d+)\.")


def parameter_role(name: str, group_layer: int) -> str:
    """`frozen`, `new` or `pretrained` for a parameter name of SegCLIP."""
    if any(re.match(p, name) for p in FROZEN_PATTERNS):
        return "frozen"
    late = _LATE_BLOCK.match(name)
    if any(re.match(p, name) for p in NEW_PATTERNS) or (late and int(late[1]) >= group_layer):
        return "new"
    return "pretrained"


def freeze_parameters(model: SegCLIP) -> None:
    for name, param in model.named_parameters():
        if parameter_role(name, model.group_layer) == "frozen":
            param.requires_grad_(False)


def parameter_groups(model: SegCLIP, config: TrainConfig) -> list[dict]:
    """Freeze the frozen parameters; return optimiser groups for the rest.

    Groups are (role, decay) pairs, each carrying `name`, `lr` and `weight_decay`,
    so a scheduler can scale every group's own base rate.
    """
    freeze_parameters(model)
    lr = {"new": config.lr_new, "pretrained": config.lr_pretrained}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = parameter_role(name, model.group_layer)
        groups.setdefault((role, not name.endswith("bias")), []).append(param)
    return [
        {
            "name": f"{role}/{'decay' if decay else 'no_decay'}",
            "params": params,
            "lr": lr[role],
            "weight_decay": config.weight_decay if decay else 0.0,
        }
        for (role, decay), params in sorted(groups.items())
    ]
