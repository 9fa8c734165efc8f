"""The ``graph`` verb: the tree of postings a posting waits for, and the
postings that wait for it.

Owns how the tree is drawn (one posting a line, under the posting that
waits for it) and its ``--json`` form. Reading it is
:meth:`pdoflowd.client.Client.graph`'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pdoflowd.cli.output import print_json
from pdoflowd.client import Client
from pdoflowd.db.dependencies import GraphNode
from pdoflowd.exitcodes import EXIT_OK

__all__ = ["draw_tree", "graph"]


def _label(node: GraphNode) -> str:
    state = node.status.value
    if node.held:
        state += ", jobs held"
    text = f"{node.uuid}  {state}  {node.target_function}"
    if node.on_failure == "run" and node.depth == 0:
        text += "  (runs even if one fails)"
    if node.cancel_reason:
        text += f"  ({node.cancel_reason})"
    return text


def _is_last(nodes: Sequence[GraphNode], index: int) -> bool:
    """Whether no later sibling follows nodes[index] (depth-first order)."""
    depth = nodes[index].depth
    for later in nodes[index + 1 :]:
        if later.depth < depth:
            return True
        if later.depth == depth:
            return False
    return True


def draw_tree(nodes: Sequence[GraphNode]) -> list[str]:
    """The tree as lines: the root first, each posting it waits for
    indented under it."""
    lines = []
    # Whether each open level still has siblings to come (draws "│").
    open_levels: list[bool] = []
    for index, node in enumerate(nodes):
        if node.depth == 0:
            lines.append(_label(node))
            open_levels = []
            continue
        last = _is_last(nodes, index)
        del open_levels[node.depth - 1 :]
        stem = "".join("│  " if more else "   " for more in open_levels)
        lines.append(stem + ("└─ " if last else "├─ ") + _label(node))
        open_levels.append(not last)
    return lines


def graph(client: Client, args: argparse.Namespace) -> int:
    nodes = client.graph(args.posting_id, depth=args.depth)
    waiting = client.dependents(nodes[0].uuid)
    if args.json:
        print_json(
            {
                "id": str(nodes[0].uuid),
                "nodes": [
                    {
                        "id": str(n.uuid),
                        "parent": None if n.parent is None else str(n.parent),
                        "depth": n.depth,
                        "status": n.status.value,
                        "target_function": n.target_function,
                        "held": n.held,
                        "on_failure": n.on_failure,
                        "cancel_reason": n.cancel_reason,
                    }
                    for n in nodes
                ],
                "waited_for_by": [
                    {
                        "id": str(ident),
                        "status": status.value,
                        "target_function": target,
                    }
                    for ident, status, target in waiting
                ],
            }
        )
        return EXIT_OK
    for line in draw_tree(nodes):
        print(line)
    if waiting:
        print("waited for by")
        for ident, status, target in waiting:
            print(f"  {ident}  {status.value}  {target}")
    return EXIT_OK
