"""Making ISMoE a PEFT method: a new `PeftType` member and the entries of PEFT's method registry.

`peft.utils.PeftType` is a closed ``str`` enum and `register_peft_method` only accepts names that are already
members, so the member is added the way ``aenum.extend_enum`` does it: a new instance of the enum class is built
and entered into the class's name and value maps. Both steps are idempotent, so importing this package twice, or
next to another plugin that extends the enum, does not fail.
"""

from __future__ import annotations

import logging

from peft.utils import PeftType

__all__ = ["ISMOE_NAME", "ISMOE_PEFT_TYPE", "extend_peft_type", "register_ismoe"]

logger = logging.getLogger(__name__)

ISMOE_NAME = "ismoe"


def extend_peft_type(value: str) -> PeftType:
    """The `PeftType` member named and valued `value`, added to the enum if it is not there yet."""
    existing = PeftType._value2member_map_.get(value)
    if existing is not None:
        return existing
    if value in PeftType._member_map_:
        raise ValueError(f"`PeftType` already has a member named {value!r} with another value; cannot extend it.")

    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    member.__init__(value)
    # EnumType.__setattr__ refuses to rebind members; type.__setattr__ adds the class attribute before the member
    # exists in the maps, so lookups by attribute, by name, by value and iteration all agree afterwards.
    type.__setattr__(PeftType, value, member)
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    logger.debug("Added %r to peft.utils.PeftType", value)
    return member


ISMOE_PEFT_TYPE = extend_peft_type(ISMOE_NAME.upper())


def register_ismoe(config_cls: type, model_cls: type) -> None:
    """Enter ISMoE in PEFT's registry unless an earlier import already did."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(ISMOE_PEFT_TYPE) is not None:
        registered = PEFT_TYPE_TO_TUNER_MAPPING.get(ISMOE_PEFT_TYPE)
        if registered is not None and registered.__qualname__ != model_cls.__qualname__:
            raise ValueError(
                f"PEFT type {ISMOE_PEFT_TYPE.value!r} is already registered to {registered.__qualname__}, "
                f"not {model_cls.__qualname__}."
            )
        return
    register_peft_method(name=ISMOE_NAME, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
