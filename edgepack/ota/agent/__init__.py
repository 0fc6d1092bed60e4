"""The device-side update agent (device side: never torch, transformers, optimum or
huggingface_hub, and nothing from edgepack's build side).

Modules: ``state`` (the state directory), ``journal`` (the update in progress), ``fetcher``
(HTTP with a total deadline, byte limits, Range resume), ``installer`` (delta staging),
``health`` (the health gate), ``config`` (what the agent is told), ``signed_repo`` (ngclient:
verified metadata and targets), ``selection`` (which release to take, pure), ``switchover``
(gate, switch, commit, rollback, recovery from the journal), ``updater`` (one update cycle).
"""
