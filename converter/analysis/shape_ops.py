"""Shape values of the head-shape interpreter (`head_shapes`) and what tensor
operations do to them; dims are code strings, None where unknown."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from converter.cst_helpers import code, nodes_of, one_line, self_attr

SPLITS = ("split", "chunk", "tensor_split")
CATS = ("cat", "concat", "concatenate")
NEW = ("new_empty", "new_zeros", "new_ones", "new_full", "zeros", "empty", "ones")


@dataclass(frozen=True)
class Shape:
    dims: tuple  # code of each dim ("-1": inferred), None where unknown
    whole: Shape | None = None  # the tensor this one is a last-dim part of


def norm(text: str | None) -> str | None:
    """Code without outer parentheses, so ``(a + b)`` and ``a + b`` compare equal, on one
    line (`one_line`: parsed inside parentheses, a wrapped ``2\n* d`` reads ``2 * d``)."""
    if text is None:
        return None
    try:
        node = cst.parse_expression(f"({text})")
    except cst.ParserSyntaxError:
        return text
    return one_line(node)


def dim_code(node: cst.CSTNode) -> str:
    """A dim's code as the interpreter compares it (`norm`)."""
    return norm(code(node))


def as_int(node: cst.BaseExpression) -> int | None:
    if isinstance(node, cst.Integer):
        return int(node.value)
    if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus):
        inner = as_int(node.expression)
        return -inner if inner is not None else None
    return None


def linear_widths(init: cst.FunctionDef) -> dict[str, str]:
    """``self.X = nn.Linear(in, out)`` (also inside a conditional) -> {X: out code}."""
    out: dict[str, str] = {}
    for assign in nodes_of(init, cst.Assign):
        attrs = [self_attr(t.target) for t in assign.targets]
        for call in nodes_of(assign.value, cst.Call):
            name = code(call.func)
            if not name.split(".")[-1] == "Linear":
                continue
            args = {a.keyword.value: a.value for a in call.args if a.keyword}
            positional = [a.value for a in call.args if a.keyword is None]
            width = args.get("out_features", positional[1] if len(positional) > 1 else None)
            for attr in attrs:
                if attr and width is not None:
                    out[attr] = dim_code(width)
    return out


def _is_ellipsis(item) -> bool:
    return isinstance(item, cst.Index) and isinstance(item.value, cst.Ellipsis)


def index_dims(base: tuple, items: list) -> object:
    """``x.shape[i]`` / ``x.shape[:-1]``: one dim, or a tuple of them."""
    if len(items) != 1:
        return None
    item = items[0]
    if isinstance(item, cst.Index) and as_int(item.value) is not None:
        i = as_int(item.value)
        return base[i] if -len(base) <= i < len(base) else None
    if isinstance(item, cst.Slice) and item.step is None:
        lo = as_int(item.lower) if item.lower is not None else None
        hi = as_int(item.upper) if item.upper is not None else None
        if (item.lower is None or lo is not None) and (item.upper is None or hi is not None):
            return base[lo:hi]
    return None


def index_shape(base: Shape, items: list) -> Shape | None:
    """``x[..., 0, :]`` (an index drops its dim), ``x[..., :r]`` (a last-dim part)."""
    rank = len(base.dims)
    known = [i for i in items if not _is_ellipsis(i)]
    ell = len(items) - len(known)
    if ell > 1 or len(known) > rank:
        return None
    # positions of the explicit items: before the ellipsis from 0, after it from the end
    split = next((k for k, i in enumerate(items) if _is_ellipsis(i)), len(items))
    positions = list(range(split)) + list(range(rank - (len(items) - split - 1), rank))
    dims, part = list(base.dims), False
    drop = []
    for pos, item in zip(positions, [i for i in items if not _is_ellipsis(i)]):
        if isinstance(item, cst.Index) and as_int(item.value) is not None:
            drop.append(pos)
        elif isinstance(item, cst.Slice):
            if item.lower is None and item.upper is None:
                continue
            if pos != rank - 1 or item.step is not None:
                dims[pos] = None
                continue
            part = True
            if item.lower is None:
                dims[pos] = dim_code(item.upper)
            elif item.upper is None and dims[pos] is not None:
                dims[pos] = norm(f"{dims[pos]} - ({dim_code(item.lower)})")
            else:
                dims[pos] = None
        else:
            return None
    dims = [d for k, d in enumerate(dims) if k not in drop]
    return Shape(tuple(dims), whole=base if part else None)


def infer_view(base: Shape, dims: tuple) -> tuple:
    """Resolve a ``-1`` that splits only the last dim of `base` (a Linear output of
    width ``A * B``, ``B`` the dims after the ``-1``) to ``A``. The dims before the
    ``-1`` must be `base`'s leading dims: as many (unknown allowed), or the same
    expressions up to size-1 dims (``[B, 1, T, W] -> [B, T, -1, D]``)."""
    if dims.count("-1") != 1 or base.dims[-1] is None:
        return dims
    i = dims.index("-1")
    lead, base_lead = dims[:i], base.dims[:-1]
    same = [d for d in lead if d != "1"] == [d for d in base_lead if d != "1"]
    if not (len(lead) == len(base_lead) or (same and None not in lead)):
        return dims
    if None in dims[i + 1 :] or i == len(dims) - 1:
        return dims
    rest = norm(" * ".join(f"({d})" for d in dims[i + 1 :]))
    width = cst.parse_expression(base.dims[-1])
    if isinstance(width, cst.BinaryOperation) and isinstance(width.operator, cst.Multiply):
        left, right = dim_code(width.left), dim_code(width.right)
        found = left if right == rest else right if left == rest else None
        if found is not None:
            return (*dims[:i], found, *dims[i + 1 :])
    return dims


def split_shape(base: Shape, method: str, args, kwargs):
    """Parts of `base` cut along its last dim by split/chunk (None elsewhere)."""
    dim = (
        as_int(kwargs["dim"])
        if "dim" in kwargs
        else (as_int(args[1].value) if len(args) > 1 else 0)
    )
    if dim is None or dim % len(base.dims) != len(base.dims) - 1 or not args:
        return None
    sizes = args[0].value
    if m.matches(sizes, m.BinaryOperation(operator=m.Multiply(), right=m.List() | m.Tuple())):
        sizes, repeat = sizes.right, as_int(sizes.left)  # n * [d]
    elif m.matches(sizes, m.BinaryOperation(operator=m.Multiply(), left=m.List() | m.Tuple())):
        sizes, repeat = sizes.left, as_int(sizes.right)  # [d] * n
    else:
        repeat = 1
    if isinstance(sizes, (cst.List, cst.Tuple)) and repeat is not None:
        elements = list(sizes.elements) * repeat
        return tuple(Shape((*base.dims[:-1], dim_code(el.value)), whole=base) for el in elements)
    count = as_int(sizes)
    if method == "split" and isinstance(sizes, cst.Integer | cst.Name | cst.Attribute):
        # split(size): parts of that size, as many as the target unpacks
        return [Shape((*base.dims[:-1], dim_code(sizes)), whole=base)] * 8
    if count is None or base.dims[-1] is None:
        return None
    last = cst.parse_expression(base.dims[-1])
    part = f"{base.dims[-1]} // {count}"
    if isinstance(last, cst.BinaryOperation) and isinstance(last.operator, cst.Multiply):
        if as_int(last.left) == count:
            part = dim_code(last.right)
        elif as_int(last.right) == count:
            part = dim_code(last.left)
    return tuple(Shape((*base.dims[:-1], norm(part)), whole=base) for _ in range(count))


def cat_shapes(parts: tuple, dim: int | None):
    """``cat``: along the last dim, the whole again when the parts are all of one tensor,
    else the parts' last dims summed; along another dim, the dims the known parts agree
    on (torch requires them equal), the cat axis summed. Unknown parts add nothing."""
    shapes = [p for p in parts if isinstance(p, Shape)]
    if not shapes or dim is None or any(len(s.dims) != len(shapes[0].dims) for s in shapes):
        return None
    rank = len(shapes[0].dims)
    axis = dim % rank
    wholes = {id(p.whole) for p in shapes}
    if axis == rank - 1 and len(shapes) == len(parts):
        if len(wholes) == 1 and shapes[0].whole is not None:
            return Shape(shapes[0].whole.dims)
    dims = list(shapes[0].dims)
    for s in shapes[1:]:
        dims = [a if a == b else None for a, b in zip(dims, s.dims)]
    sizes = [s.dims[axis] for s in shapes]
    known = len(shapes) == len(parts) and None not in sizes
    dims[axis] = norm(" + ".join(f"({d})" for d in sizes)) if known else None
    return Shape(tuple(dims))


def merge(a, b):
    """A value after an if/else: what both branches agree on, dim by dim."""
    if a is b or a == b:
        return a
    if isinstance(a, Shape) and isinstance(b, Shape) and len(a.dims) == len(b.dims):
        dims = tuple(x if x == y else None for x, y in zip(a.dims, b.dims))
        return Shape(dims, a.whole if a.whole is b.whole else None)
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(merge(x, y) for x, y in zip(a, b))
    return None
