"""The docstring examples of the public API run and print what they say."""
import doctest

import pytest
import torch

import fastdropout


@pytest.mark.parametrize("fn", [fastdropout.dropout, fastdropout.dropout_mask, fastdropout.bias_dropout_add])
def test_docstring_examples(fn):
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(fn, fn.__name__, globs={"torch": torch, "fastdropout": fastdropout}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0
