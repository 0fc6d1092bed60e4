"""Over-the-air updates: the signed static repository and the device agent.

``repo``, ``release``, ``chunks`` and ``retention`` run where bundles are published (the build
machine or a release host): TUF metadata, chunk indexes, garbage collection. ``agent/`` runs on
the device and imports nothing from the build side.
"""
