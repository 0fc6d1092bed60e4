"""Offline install of a bundle on the device (``edgepack install``, ``BUNDLE/install.sh``).

Device side: standard library and the small core only; ``python3 -m edgepack.install`` runs
from edgepack's own wheel on a device that has nothing but python3 and python3-venv.
"""

from __future__ import annotations
