"""The docstring examples of the math modules run and hold (each checks its defining equation).

dfmpc.baselines.dfq and dfmpc.baselines.squant run theirs in tests/test_dfq.py and tests/test_squant.py."""

import doctest

import pytest

import dfmpc.baselines.ocs
import dfmpc.baselines.rtn
import dfmpc.compensation
import dfmpc.pairing
import dfmpc.probes
import dfmpc.quantizers
import dfmpc.reconstruction


@pytest.mark.parametrize("module", [dfmpc.quantizers, dfmpc.compensation, dfmpc.reconstruction, dfmpc.pairing,
                                    dfmpc.baselines.rtn, dfmpc.baselines.ocs, dfmpc.probes],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if module is not dfmpc.pairing:
        assert result.attempted > 0
