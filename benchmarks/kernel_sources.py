"""Which lines of the model each Inductor kernel came from, read from a compile log.

Why: a kernel profile names Inductor's kernels only by their fused aten ops
(`triton_poi_fused_select_6`). The output code's comment above each Triton kernel lists the graph
nodes it fused, and the post-grad graph names the source line of each node.

Usage:
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 TORCH_LOGS=output_code,post_grad_graphs,graph_code CMD 2> code.log
    python benchmarks/kernel_sources.py code.log [REGEX]
Prints, once per kernel name matching REGEX (all when none): its source nodes, each with the line it
came from. (The caches must be off: a cached graph logs its output code but not its graph.)
"""
import re
import sys

PREFIX = re.compile(r"^.*?\[__\w+\] ")  # the logger's "V1129 03:41:41 ... [__output_code] "
source_of, last_file = {}, None
kernels, seen, comments = [], set(), []
for raw in open(sys.argv[1], errors="replace"):
    line = PREFIX.sub("", raw.rstrip("\n"), count=1)
    file_comment = re.match(r"^\s*# File: (.*)", line)
    if file_comment:
        last_file = file_comment.group(1)
        continue
    node = re.match(r"^\s+(\w+)(: \"[^\"]*\")? = ", line)  # a node of a logged graph, after its source line
    if node and last_file:
        if last_file not in source_of.setdefault(node.group(1), []):
            source_of[node.group(1)].append(last_file)
        continue
    kernel = re.match(r"^(\w+) = async_compile\.\w+\(", line)
    if kernel:
        name = kernel.group(1)
        if name not in seen:
            seen.add(name)
            nodes = next((re.search(r"Source Nodes: \[([^\]]*)\]", c) for c in comments if "Source Nodes" in c), None)
            kernels.append((name, nodes.group(1).split(", ") if nodes else []))
        comments = []
    elif line.startswith("#"):
        comments.append(line)
    elif line.strip():
        comments = []

pattern = re.compile(sys.argv[2] if len(sys.argv) > 2 else ".")
for name, nodes in kernels:
    if pattern.search(name):
        print(f"== {name}")
        for n in nodes:
            print(f"   {n}: {' | '.join(source_of.get(n, ['?']))}")
