"""imports: relative imports become absolute against the source's package."""

import libcst as cst
import pytest

from converter.context import ConversionContext
from converter.errors import ConversionError
from converter.passes import imports

SOURCE = """\
from ... import initialization as init
from ...utils import logging
from ...utils.generic import merge_with_config_defaults
from .configuration_llama import LlamaConfig
import torch
if True:
    from ...integrations import flex
"""


def test_absolute_imports():
    ctx = ConversionContext.from_source(
        SOURCE, "modeling_llama.py", "llama", "transformers.models.llama"
    )
    code = imports.run(cst.parse_module(SOURCE), ctx).code
    assert "from transformers import initialization as init" in code
    assert "from transformers.utils import logging" in code
    assert "from transformers.utils.generic import merge_with_config_defaults" in code
    assert "from transformers.models.llama.configuration_llama import LlamaConfig" in code
    assert "    from transformers.integrations import flex" in code
    assert "import torch" in code


def test_climbing_above_the_package_is_an_error():
    source = "from ..... import x\n"
    ctx = ConversionContext.from_source(
        source, "modeling_llama.py", "llama", "transformers.models.llama"
    )
    with pytest.raises(ConversionError, match="climbs above"):
        imports.run(cst.parse_module(source), ctx)


def test_imports_of_modules_beside_local_code_stay_relative():
    """A model directory's own code: its one-dot imports of the modules beside it stay
    (they are written beside the generated module); the rest resolve in transformers."""
    source = (
        "from .configuration_mylm import MyLMConfig\n"
        "from . import helpers_mylm\n"
        "from .configuration_llama import LlamaConfig\n"
        "from ...utils import logging\n"
    )
    ctx = ConversionContext.from_source(
        source, "modeling_mylm.py", "mylm", "transformers.models.mylm"
    )
    ctx.local_modules = frozenset({"configuration_mylm", "helpers_mylm"})
    code = imports.run(cst.parse_module(source), ctx).code
    assert "from .configuration_mylm import MyLMConfig" in code
    assert "from . import helpers_mylm" in code
    assert "from transformers.models.mylm.configuration_llama import LlamaConfig" in code
    assert "from transformers.utils import logging" in code
