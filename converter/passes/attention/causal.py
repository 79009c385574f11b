"""Causality: paged attention is causal only, and the attention interface's contract says
whether a layer is through ``self.is_causal``.

- ``self.is_causal = False``: the conversion stops (a bidirectional layer).
- ``self.is_causal = not <param>`` / ``= <param>`` of a constructor parameter (GPT-2's
  ``not is_cross_attention``): every instance that builds has that parameter pinned, so
  ``__init__`` refuses the other value first and the parameter, and any attribute that
  holds it, are that constant in the class (the cross-attention arms go: GPT-2's
  ``q_attn`` and its two-projection ``c_attn``).
- any other expression: a guard after the layer is built refuses the bidirectional
  configuration.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.context import ConversionContext
from converter.cst_helpers import flat_statements, methods_of, self_attr
from converter.passes.pin import pin_parameter


def causal_flag(init: cst.FunctionDef) -> cst.BaseExpression | None:
    """The value assigned to ``self.is_causal`` in ``__init__``, if any."""
    for small in flat_statements(init.body.body):
        if isinstance(small, cst.Assign) and any(
            self_attr(t.target) == "is_causal" for t in small.targets
        ):
            return small.value
    return None


def pinned_parameter(init: cst.FunctionDef) -> tuple[str, bool] | None:
    """(parameter, the value it has in every instance that builds) when ``self.is_causal``
    is a constructor parameter or its negation."""
    flag = causal_flag(init)
    negated = m.matches(flag, m.UnaryOperation(operator=m.Not(), expression=m.Name()))
    name = flag.expression if negated else flag
    params = {p.name.value for p in init.params.params}
    if isinstance(name, cst.Name) and name.value in params:
        return name.value, not negated
    return None


def pin(ctx: ConversionContext, cls: cst.ClassDef) -> cst.ClassDef:
    """`cls` with a pinned constructor parameter (`pinned_parameter`) refused at the top
    of ``__init__`` and folded into the class as a constant."""
    init = methods_of(cls).get("__init__")
    found = pinned_parameter(init) if init is not None else None
    if found is None:
        return cls
    param, value = found
    ctx.log.append(f"{cls.name.value}: {param}={value} in every instance that builds (is_causal)")
    return pin_parameter(
        cls, param, value, "makes attention bidirectional; paged attention is causal only"
    )


def guard(ctx: ConversionContext, cls: str, init: cst.FunctionDef) -> list[cst.BaseStatement]:
    """The statements ``__init__`` ends with for its ``self.is_causal``: none when causal,
    a refusal of the bidirectional configuration when the config decides it."""
    flag = causal_flag(init)
    if flag is None or m.matches(flag, m.Name("True")):
        return []
    if m.matches(flag, m.Name("False")):
        raise ctx.error(
            f"{cls} is not causal (is_causal = False)",
            init,
            scope=f"{cls}.__init__",
            hint="paged attention is causal only; extend PagedAttention for bidirectional layers",
        )
    # configuration-dependent: refuse the bidirectional configuration at build time
    return [
        cst.parse_statement(
            "if not self.is_causal:\n"
            f'    raise ValueError("{cls}: this configuration makes attention bidirectional; '
            'paged attention is causal only")\n'
        )
    ]
