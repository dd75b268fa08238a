"""The shared core every package builds on.

* ``errors``: the one error type for bad input (``ConfigError``) and the argument checks;
* ``batches``: batches as mappings ``{x, y, idx, gap}``, moved and counted;
* ``distributed``: collectives (gather by index, sums) that are no-ops in one process;
* ``per_sample``: one pass over a loader that places per-sample outputs by index;
* ``allocator``: glibc's malloc tuned so CPU steps reuse freed activations.
"""

from .allocator import tune_malloc
from .batches import Batch, as_batch, batch_len, batch_to
from .distributed import all_reduce_sum, comm_device, gather_by_index, is_distributed
from .errors import ConfigError, check_bool, check_choice, check_int, check_number
from .per_sample import collect_logits, per_sample_outputs

__all__ = [
    "Batch",
    "ConfigError",
    "all_reduce_sum",
    "as_batch",
    "batch_len",
    "batch_to",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "collect_logits",
    "comm_device",
    "gather_by_index",
    "is_distributed",
    "per_sample_outputs",
    "tune_malloc",
]
