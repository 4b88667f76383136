"""The ops and model code stay free of the operations that break static graphs on XLA / neuronx-cc.

A traced graph (torch-xla, ``torch_neuronx.trace``) needs shapes fixed by the configuration and no reads of tensor
values on the host (docs/xla.md, static-graph rules). Forbidden, found by parsing the source with ``ast`` (no
import, so it runs everywhere):

* ``sort``, ``argsort``, ``msort``, ``topk``, ``kthvalue``: lower to an XLA ``sort``, which neuronx-cc handles badly
  (``bmojo.xla_audit.FORBIDDEN_OPCODES``; the selection ops use rounds of ``argmax`` instead);
* ``nonzero``, ``argwhere``, ``unique``, ``unique_consecutive``, ``masked_select``, ``torch.where`` with one argument
  and boolean-mask indexing (``x[mask]``, ``x[x > 0]``, ``x[~keep]``): results whose shape depends on the data;
* ``unfold``: materialises overlapping windows as a gather (blocks come from reshapes);
* ``cumsum``, ``cumprod``, ``cummax``, ``cummin``, ``logcumsumexp``: lower to an HLO ``reduce-window``, a neuronx-cc
  trouble spot (``FORBIDDEN_OPCODES``; prefix sums are matmuls with triangular ones, as in ``ops/ssd/chunk.py``);
* ``.item()``, ``.tolist()``: a device-to-host read, which cuts the graph and waits for the device.

Boolean-mask indexing is undecidable from the source alone; an index counts as a mask when it is a comparison, a
``~``/``not``/``&``/``|`` of one, a call of ``.bool()``/``.eq()``/``.logical_not()``/... or a name ending in ``mask``.

Scope: every module under ``src/bmojo/ops/`` and the model modules (``modeling*`` and ``layers*``, ``mixers*``,
``memory*``, ``cache*``, ``models*``: files or packages directly under ``src/bmojo``). Exempt:

* the reference forms, functions named ``*_ref`` (and what is nested in them): the ``reference`` backend and the
  tests run them on the CPU, never in a traced graph (the ``*_ref`` naming of state-spaces/mamba's ``ops``);
* an audited exception, marked in the source with ``# static-graph: ok (reason)`` on the offending line (any line
  of a multi-line expression) or on the ``def`` line of the function that holds it (the whole function). The
  reason in parentheses is required.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bmojo"
MODEL_PREFIXES = ("modeling", "layers", "mixers", "memory", "cache", "models")

FORBIDDEN_METHODS = {
    "sort": "sorts (an XLA sort)",
    "argsort": "sorts (an XLA sort)",
    "msort": "sorts (an XLA sort)",
    "topk": "sorts (an XLA sort)",
    "kthvalue": "sorts (an XLA sort)",
    "nonzero": "a data-dependent shape",
    "argwhere": "a data-dependent shape",
    "unique": "a data-dependent shape",
    "unique_consecutive": "a data-dependent shape",
    "masked_select": "a data-dependent shape",
    "unfold": "overlapping windows (a gather); use reshapes",
    **dict.fromkeys(
        ["cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"],
        "a prefix scan (an HLO reduce-window); use a matmul with triangular ones",
    ),
    "item": "a host read of a tensor value",
    "tolist": "a host read of tensor values",
}
BOOL_METHODS = {
    "bool", "eq", "ne", "gt", "ge", "lt", "le", "logical_not", "logical_and", "logical_or", "logical_xor",
    "isnan", "isinf", "isfinite", "isin",
}  # fmt: skip
MARKER = re.compile(r"#\s*static-graph:\s*ok\b(.*)")
REASON = re.compile(r"^\s*\(\s*\S.*\)")


def scanned_files(src: Path = SRC) -> list[Path]:
    """The ops and model modules (see the module docstring), sorted."""
    files = sorted((src / "ops").rglob("*.py"))
    for entry in sorted(src.iterdir()):
        if entry.name.startswith(MODEL_PREFIXES):
            files += [entry] if entry.suffix == ".py" else sorted(entry.rglob("*.py"))
    return files


def _is_mask(node: ast.AST) -> bool:
    """Does this index expression look like a boolean tensor (see the module docstring)?"""
    if isinstance(node, (ast.Compare, ast.BoolOp)):
        return True
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.Invert, ast.Not)) or _is_mask(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
        return _is_mask(node.left) or _is_mask(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in BOOL_METHODS
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.lower().endswith("mask")


def _violation(node: ast.AST) -> str | None:
    """What is forbidden about this node, or None."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_METHODS:
            return f"{func.attr}: {FORBIDDEN_METHODS[func.attr]}"
        if isinstance(func, ast.Name) and func.id in FORBIDDEN_METHODS:  # from torch import nonzero
            return f"{func.id}: {FORBIDDEN_METHODS[func.id]}"
        if isinstance(func, ast.Attribute) and func.attr == "where" and len(node.args) == 1 and not node.keywords:
            return "where with one argument: a data-dependent shape (nonzero)"
    if isinstance(node, ast.Subscript):
        parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if any(_is_mask(part) for part in parts):
            return f"boolean-mask indexing {ast.unparse(node)!r}: a data-dependent shape"
    return None


def _marked(lines: list[str], first: int, last: int) -> str | None:
    """'ok' when a line in [first, last] (1-based) carries a marker with a reason, 'no reason' for one without."""
    found = None
    for line in lines[first - 1 : last]:
        match = MARKER.search(line)
        if match:
            if REASON.match(match.group(1)):
                return "ok"
            found = "no reason"
    return found


def check_source(text: str, name: str) -> list[str]:
    """``name:line: what`` for every forbidden construct in ``text`` that is neither exempt nor marked."""
    lines = text.splitlines()
    found: list[str] = []

    def visit(node: ast.AST, audited: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name.endswith("_ref"):
                return  # a reference form (see the module docstring)
            header_end = node.body[0].lineno - 1 if node.body else node.lineno
            mark = _marked(lines, node.lineno, max(node.lineno, header_end))
            if mark == "no reason":
                found.append(f"{name}:{node.lineno}: '# static-graph: ok' needs a reason in parentheses")
            audited = audited or mark == "ok"
        what = None if audited else _violation(node)
        if what:
            mark = _marked(lines, node.lineno, node.end_lineno or node.lineno)
            if mark != "ok":
                suffix = " ('# static-graph: ok' needs a reason in parentheses)" if mark else ""
                found.append(f"{name}:{node.lineno}: {what}{suffix}")
        for child in ast.iter_child_nodes(node):
            visit(child, audited)

    visit(ast.parse(text, filename=name), False)
    return found


def test_the_scope_holds_the_ops_and_the_model():
    names = {p.relative_to(SRC).as_posix() for p in scanned_files()}
    assert any(n.startswith("ops/") for n in names)
    assert any(n.startswith(MODEL_PREFIXES) for n in names)


def test_ops_and_model_code_use_no_op_that_breaks_static_graphs():
    root = SRC.parents[1]
    found = []
    for path in scanned_files():
        found += check_source(path.read_text(), str(path.relative_to(root)))
    assert not found, "ops that break static graphs (see tests/test_static_graph_ops.py):\n" + "\n".join(found)


PLANTED = '''\
import torch


def forward(x, scores, keep, idx, positions):
    a = torch.sort(scores)                      # 5
    b = scores.argsort(dim=-1)                  # 6
    c = torch.nonzero(keep)                     # 7
    d = x.unfold(1, 4, 4)                       # 8
    e = torch.where(keep)                       # 9
    f = x[keep_mask]                            # 10
    g = x[scores > 0]                           # 11
    h = x[:, ~keep]                             # 12
    i = scores.max().item()                     # 13
    j = positions.tolist()                      # 14
    k = x[idx.bool()]                           # 15
    fine = torch.where(keep, x, 0) + x[idx] + x[:, 1:3] + len(sorted([3, 1]))
    ok = positions.tolist()  # static-graph: ok (CPU-only, guarded by the caller)
    bad = positions.tolist()  # static-graph: ok
    return torch.topk(
        scores, 2)                              # 19


def helper_ref(scores):
    return scores.sort()


def imported(x, mask):
    x[mask] = 0                                 # 28
    return nonzero(x)                           # 29


def audited(x):  # static-graph: ok (runs on the host before tracing)
    return x.nonzero()
'''


def test_the_check_fails_on_planted_ops_naming_file_and_line(tmp_path):
    path = tmp_path / "planted.py"
    path.write_text(PLANTED)
    found = check_source(path.read_text(), str(path))
    lines = [int(f.split(":")[1]) for f in found]
    assert lines == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 18, 19, 28, 29], found
    assert all(f.startswith(f"{path}:") for f in found)
    assert found[0].endswith("sort: sorts (an XLA sort)")
    assert "where with one argument" in found[4] and "'x[keep_mask]'" in found[5]
    assert found[11].endswith("('# static-graph: ok' needs a reason in parentheses)")
    assert found[12].startswith(f"{path}:19: topk")
