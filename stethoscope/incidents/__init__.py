"""Incidents: the batch, RNG states and weights of a step that went non-finite or spiked, and its replay.

* capture — :mod:`stethoscope.incidents.extension` (built by every monitor; ``incidents:`` in the config)
  writes ``RUN_DIR/incidents/step-<N>/``; :mod:`~stethoscope.incidents.capture` is the folder's format;
* data indices — :mod:`~stethoscope.incidents.indices` (``mon.extension("incidents").watch_loader(loader)``,
  and :class:`SkipSampler` over ``skip_batches.json`` on restart);
* replay — :func:`replay` (``stethoscope replay``) reruns the step under trace mode.

See docs/replay.md.
"""

from __future__ import annotations

from stethoscope.incidents.capture import IncidentError
from stethoscope.incidents.indices import SkipSampler, skip_indices
from stethoscope.incidents.replay import ReplayResult, replay

__all__ = ["IncidentError", "ReplayResult", "SkipSampler", "replay", "skip_indices"]
