"""Test helper: what autograd recorded behind a tensor (node type names)."""
import torch

# Nodes autograd adds when an in-place op writes into a view of another tensor's result: in
# backward each copies the whole base tensor twice and zero-fills it (codetr/model/mlp.py).
VIEW_REBASE = {"CopySlices", "AsStridedBackward0"}


def graph_nodes(out: torch.Tensor) -> set[str]:
    """Type names of every autograd node behind `out`."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names
