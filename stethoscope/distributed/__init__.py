"""Many processes under ``torch.distributed``: per-rank heartbeats, stall attribution across ranks,
optional cross-rank gradient statistics, and rank 0's merge of the ranks' findings (docs/distributed.md).

The monitor itself puts each rank's files under ``run_dir/rank{N}/``; the
:mod:`~stethoscope.distributed.extension` does the rest, built only when a process group of more than one
rank is initialised.
"""

from stethoscope.distributed.heartbeats import RankHeartbeats, activity_of
from stethoscope.distributed.merge import merge_ranks

__all__ = ["RankHeartbeats", "activity_of", "merge_ranks"]
