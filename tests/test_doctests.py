"""The docstring examples of the math modules run and hold (each checks its defining equation)."""

import doctest

import pytest

import dfmpc.compensation
import dfmpc.pairing
import dfmpc.quantizers
import dfmpc.reconstruction


@pytest.mark.parametrize("module", [dfmpc.quantizers, dfmpc.compensation, dfmpc.reconstruction, dfmpc.pairing],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if module is not dfmpc.pairing:
        assert result.attempted > 0
