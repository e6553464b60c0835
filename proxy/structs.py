"""The base of every config Struct, in a module of its own so that any package can import it."""

from typing import Annotated

import msgspec

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class Base(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", frozen=True, kw_only=True):
    """Strict: an unknown key is a typo. kebab-case keys. Frozen: config is shared by every request."""
