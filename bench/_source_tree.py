"""Lets the scripts in bench/ run from a source tree whose fastdropout is built in place
(``python setup.py build_ext --inplace``, as scripts/gpu_check.sh builds it) and not installed:
run as ``python bench/X.py``, Python puts bench/ on sys.path, not the tree's root. An installed
fastdropout (pip, editable or not) is found first and used as it is.

Import it before fastdropout: ``import _source_tree  # noqa: F401``.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("fastdropout") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
