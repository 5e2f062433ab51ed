"""Fast walks over a syntax tree: ``ast.walk`` and ``ast.iter_child_nodes`` are generators over generators, and
they took most of the time of compiling a test suite (which the judge does once per suite)."""

from __future__ import annotations

import ast


def children(node: ast.AST) -> list[ast.AST]:
    """The direct child nodes of ``node``, in field order."""
    out: list[ast.AST] = []
    for name in node._fields:
        value = getattr(node, name, None)
        if type(value) is list:
            out.extend(v for v in value if isinstance(v, ast.AST))
        elif isinstance(value, ast.AST):
            out.append(value)
    return out


def nodes(*trees: ast.AST) -> list[ast.AST]:
    """Every node of ``trees``, the trees themselves included (in no particular order)."""
    out: list[ast.AST] = []
    stack = list(trees)
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(children(node))
    return out


def parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    """Each node of ``tree`` (but the root) mapped to its parent."""
    out: dict[ast.AST, ast.AST] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in children(node):
            out[child] = node
            stack.append(child)
    return out


def mentions(tree: ast.AST, names: set[str] | frozenset[str]) -> bool:
    """Whether ``tree`` reads or binds any of ``names`` as a plain name."""
    return any(type(n) is ast.Name and n.id in names for n in nodes(tree))  # type: ignore[attr-defined]
