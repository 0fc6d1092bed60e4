"""The device-side update agent (device side: never torch, transformers, optimum or
huggingface_hub, and nothing from edgepack's build side).

Modules: ``state`` (the state directory), ``journal`` (the update in progress), ``fetcher``
(HTTP with a total deadline, byte limits, Range resume), ``installer`` (delta staging),
``health`` (the health gate), ``updater`` (one update cycle and recovery).
"""
