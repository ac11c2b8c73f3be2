"""Erasing what the user names without hand-tuning: per-model defaults (:mod:`.defaults`), an automatic retain
set (:mod:`.retain`), a neighbour set with extra retain weight (:mod:`.neighbours`), both applied by
:func:`erasure.auto.prepare.prepare_concepts` inside :func:`erasure.erase`, and budgeted tuning (:mod:`.tune`).

This package's ``__init__`` imports nothing heavy: :mod:`erasure.config` imports :mod:`.config` from it.
"""
