"""Tensor and expert parallelism: one model split over several processes (docs/multi-gpu.md).

group.py: the process group and its collectives; shard.py: which heads, columns and experts each
rank holds, and the load plan rewritten to read only those; lockstep.py: rank 0 drives the token
loop and the other ranks repeat its decoder calls; launch.py: starting and stopping those ranks.
"""
