"""Semantically neutral edits of a modeling file, for the determinism property test:
strip every comment, add comment lines before statements, re-wrap with a different
line length (the pinned ruff's formatter), and reorder the top-level functions and the
classes the converter drops (task heads such as `*ForSequenceClassification`)."""

from __future__ import annotations

import ast
import subprocess

import libcst as cst

from converter.render import ruff_binary

# Task heads a causal-LM conversion never keeps: reordering them changes nothing.
DROPPED_HEADS = ("ForSequenceClassification", "ForQuestionAnswering", "ForTokenClassification")


class _StripComments(cst.CSTTransformer):
    def leave_EmptyLine(self, original: cst.EmptyLine, updated: cst.EmptyLine) -> cst.EmptyLine:
        return updated.with_changes(comment=None)

    def leave_TrailingWhitespace(
        self, original: cst.TrailingWhitespace, updated: cst.TrailingWhitespace
    ) -> cst.TrailingWhitespace:
        return updated.with_changes(comment=None)


class _AddComments(cst.CSTTransformer):
    """A comment line before the statements whose pre-order numbers are in `targets`."""

    def __init__(self, targets: set[int]) -> None:
        self.targets = targets
        self.seen = -1
        self.chosen: set[int] = set()

    def on_visit(self, node: cst.CSTNode) -> bool:
        if isinstance(node, (cst.SimpleStatementLine, cst.BaseCompoundStatement)) and hasattr(
            node, "leading_lines"
        ):
            self.seen += 1
            if self.seen in self.targets:
                self.chosen.add(id(node))
        return True

    def on_leave(self, original: cst.CSTNode, updated: cst.CSTNode) -> cst.CSTNode:
        if id(original) in self.chosen:
            note = cst.EmptyLine(comment=cst.Comment("# neutral: a reviewer's note"))
            return updated.with_changes(leading_lines=[*updated.leading_lines, note])
        return updated


def count_statements(source: str) -> int:
    counter = _AddComments(set())
    cst.parse_module(source).visit(counter)
    return counter.seen + 1


def movable(source: str) -> tuple[list[int], list[int]]:
    """Positions (in the module body) of the top-level functions and of the dropped heads."""
    body = cst.parse_module(source).body
    functions = [i for i, s in enumerate(body) if isinstance(s, cst.FunctionDef)]
    heads = [
        i
        for i, s in enumerate(body)
        if isinstance(s, cst.ClassDef) and s.name.value.endswith(DROPPED_HEADS)
    ]
    return functions, heads


def reorder(source: str, positions: list[int], order: list[int]) -> str:
    """Put the statements at `positions` in `order` (a permutation of range(len))."""
    module = cst.parse_module(source)
    body = list(module.body)
    moved = [body[positions[k]] for k in order]
    for pos, stmt in zip(positions, moved):
        body[pos] = stmt
    return module.with_changes(body=body).code


def strip_comments(source: str) -> str:
    return cst.parse_module(source).visit(_StripComments()).code


def add_comments(source: str, targets: set[int]) -> str:
    return cst.parse_module(source).visit(_AddComments(targets)).code


def rewrap(source: str, line_length: int) -> str:
    cmd = [ruff_binary(), "format", "--isolated", "--line-length", str(line_length), "-"]
    proc = subprocess.run(cmd, input=source, capture_output=True, text=True, check=True)
    return proc.stdout


def normalized(code: str) -> tuple[dict[str, str], list[str]]:
    """A generated module up to formatting, comments and the order of its top-level defs:
    ({name: AST dump} for functions and classes, [AST dump] of the other statements)."""
    defs, rest = {}, []
    for stmt in ast.parse(code).body:
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            defs[stmt.name] = ast.dump(stmt)
        else:
            rest.append(ast.dump(stmt))
    return defs, rest
