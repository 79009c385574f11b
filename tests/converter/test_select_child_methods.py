"""select + call graph: a method another class calls on an owned module stays live
(gemma3n's decoder layer calls `self.altup.predict(...)`, `.correct(...)`,
`.scale_corrected_output(...)` on its Gemma3nTextAltUp, which has no forward)."""

from converter.hf.resolve import transformers_root
from converter.passes import imports, select
from converter.pipeline import convert_source


def test_methods_called_on_owned_modules_are_kept():
    path = transformers_root() / "models" / "gemma3n" / "modeling_gemma3n.py"
    conversion = convert_source(path.read_text(), path, "gemma3n", stages=[imports.run, select.run])
    code = conversion.code
    altup = code[code.index("class Gemma3nTextAltUp") :]
    altup = altup[: altup.index("\nclass ")]
    for method in ("def predict(", "def correct(", "def scale_corrected_output("):
        assert method in altup
