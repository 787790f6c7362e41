"""Register ``"MOPE"`` as a PEFT method.

PEFT 0.21's :func:`peft.register_peft_method` only accepts names that are already members of
:class:`peft.utils.peft_types.PeftType`, a closed ``str`` enum. Plain string keys are not an
option: transformers calls ``peft_type.value.lower()``. So mope adds the enum member itself,
here and nowhere else, and ``tests/test_registration.py`` fails loudly if a PEFT upgrade
changes the enum's internals.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "MOPE"
PREFIX = "mope_"


def add_peft_type_member(name: str = PEFT_TYPE_NAME) -> PeftType:
    """Add ``name`` to ``PeftType`` (idempotent) and return the member.

    The member is made the way ``enum`` makes its own: it lands in the member map, the value
    map, the ordered member names and as a class attribute, so ``PeftType(name)``,
    ``PeftType[name]``, ``list(PeftType)``, pickling and deep copies all work.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(config_cls: type, model_cls: type) -> None:
    """Make ``peft_type="MOPE"`` known to PEFT's config, tuner and prefix tables (idempotent).

    ``mope/__init__.py`` calls it with ``MoPEConfig`` and ``MoPEModel``.
    """
    peft_type = add_peft_type_member()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
