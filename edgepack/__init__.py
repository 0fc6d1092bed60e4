"""edgepack: build, serve and update models on edge devices.

This module stays import-light: device-side code imports ``edgepack`` and must not pull in
torch, transformers, optimum or huggingface_hub.
"""

from __future__ import annotations

__version__ = "0.1.0"
