"""Imports every model family so that each registers itself. Add new families here."""
from . import dvad  # noqa: F401
from . import padim  # noqa: F401
from . import omniad  # noqa: F401
from . import adapted_moe  # noqa: F401
from . import fewshot  # noqa: F401
from . import patchcore  # noqa: F401
