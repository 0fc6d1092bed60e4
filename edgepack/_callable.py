"""Let ``edgepack.build(...)`` and ``edgepack.plan(...)`` work although ``edgepack.build`` and
``edgepack.plan`` are also subpackages.

Importing a subpackage sets it as an attribute of its parent (the import system does so after
loading it), which would hide a function of the same name. Instead the subpackage module
itself becomes callable and forwards to :mod:`edgepack.api`, whatever the import order.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _ApiModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        api = importlib.import_module("edgepack.api")
        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Make the module ``edgepack.NAME`` callable as ``edgepack.api.NAME``."""
    sys.modules[module_name].__class__ = _ApiModule
