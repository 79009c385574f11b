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
