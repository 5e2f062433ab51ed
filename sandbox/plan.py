"""Calls known before the tests run, which the job process answers ahead of time (fewer round trips).

Most tests are plain assert lines that call the function with literal arguments
(``assert candidate([1, 2], 3) == 5``). So, before the tests run, the judge can know the first requests they
will make: it sends them with the program, and the job process answers each one, in order, right after
loading the program, exactly as it would have when asked. While the tests run, every request the judge makes
is compared, as pickled bytes, with the next planned one: equal, its answer is read from the channel (usually
already there); different, the attempt is void (the job ran a call the tests did not make) and the judge
runs the job again without a plan. Only arguments are planned; expected values never leave the judge.

Rule: the plan is the longest prefix of the test steps, in order, in which every step either mentions no
name of the program (it makes no request) or is one ``assert`` whose only mention of a program name is one
direct call of the entry point with literal arguments, not under a short-circuit, a conditional, a
comprehension or a lambda (it might not run, or run more than once), and whose value is neither called nor
has an attribute taken (on a stand-in that would be one more request). Nothing that runs before the steps
(setup, module-level test code) may mention a program name.
"""

from __future__ import annotations

import ast
import pickle
from collections.abc import Iterable

from sandbox import ast_walk

_UNSURE = (ast.BoolOp, ast.IfExp, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
           ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)
ENTRY_HANDLE = 0  # the job describes the entry point first, so a function there is its object 0


def planned_requests(before: Iterable[ast.AST], steps: Iterable[tuple[list[ast.stmt], list[ast.AST]]],
                     callees: set[str], program_names: set[str]) -> tuple[bytes, ...]:
    """The pickled ``call`` requests of the plan (see the module docstring), in order.

    ``steps`` are each step's statements and all their nodes; ``callees`` the names that stand for the entry
    point (it, and the check function's parameter); ``program_names`` every name that resolves to the program.
    """
    names = callees | program_names
    if any(ast_walk.mentions(tree, names) for tree in before):
        return ()
    calls: list[ast.Call] = []
    for body, nodes in steps:
        mentions = [n for n in nodes if type(n) is ast.Name and n.id in names]  # type: ignore[attr-defined]
        if not mentions:
            continue
        call = _planned_call(body, mentions, callees)
        if call is None:
            break
        calls.append(call)
    return tuple(pickle.dumps(("call", ENTRY_HANDLE, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
                 for args, kwargs in _arguments(calls))


def _planned_call(body: list[ast.stmt], mentions: list[ast.Name], callees: set[str]) -> ast.Call | None:
    """The step's one call of the entry point, if the rule lets it be planned."""
    if len(body) != 1 or not isinstance(body[0], ast.Assert) or len(mentions) != 1 or mentions[0].id not in callees:
        return None
    parents = ast_walk.parents(body[0])
    call = parents.get(mentions[0])
    if not isinstance(call, ast.Call) or call.func is not mentions[0]:
        return None
    user = parents.get(call)
    if isinstance(user, ast.Attribute) or (isinstance(user, ast.Call) and user.func is call):
        return None
    node: ast.AST = call
    while node in parents:
        node = parents[node]
        if isinstance(node, _UNSURE):
            return None
    if any(k.arg is None for k in call.keywords):
        return None
    try:
        for value in (*call.args, *(k.value for k in call.keywords)):
            ast.literal_eval(value)  # literals only (a Starred argument is refused here too)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return call


def _arguments(calls: list[ast.Call]) -> list[tuple[tuple[object, ...], dict[str, object]]]:
    """Each call's (args, kwargs), evaluated as one compiled expression, like the tests' own code: equal
    constants are shared the same way, so the pickled bytes match those of the real calls."""
    if not calls:
        return []
    pairs = []
    for call in calls:
        keys: list[ast.expr | None] = [ast.Constant(k.arg) for k in call.keywords]
        args = ast.Tuple(elts=list(call.args), ctx=ast.Load())
        kwargs = ast.Dict(keys=keys, values=[k.value for k in call.keywords])
        pair = ast.Tuple(elts=[args, kwargs], ctx=ast.Load())
        for made in (*keys, args, kwargs, pair):  # the nodes made here take the call's position
            ast.copy_location(made, call)  # type: ignore[arg-type]
        pairs.append(pair)
    expression = ast.Expression(ast.copy_location(ast.List(elts=pairs, ctx=ast.Load()), calls[0]))
    return eval(compile(expression, "<plan>", "eval"), {"__builtins__": {}})  # noqa: S307
