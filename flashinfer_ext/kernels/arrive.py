"""The last-arrival step shared by the one-launch kernel variants.

A group of programs of one launch (the chunk programs of a (request, KV head) in
``page_select._bounds_select_kernel``, the split programs in ``paged_decode._decode_split_kernel`` with
``FUSED_MERGE``) each store a partial result, then count themselves in a per-group int32 counter; the
program that completes the count does the group's final step on everyone's results and resets the
counter for the next launch. No program waits for another.
"""

import triton
import triton.language as tl


@triton.jit
def _last_to_arrive(counter, total):
    """Count this program in ``*counter``; True for the program that makes it ``total`` (which resets it).

    The barrier before the count orders every thread's stores before the (release) atomic; the atomic's
    acquire side and the barrier after it order the last program's later reads after all the counts.
    Those reads must bypass L1 (``cache_modifier=".cg"``): other SMs wrote the data."""
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == total - 1
    if last:
        tl.store(counter, 0)
    tl.debug_barrier()
    return last
