"""What ``mymps_magic._pickling`` relies on of cloudpickle's private names still holds.

The pickle cache reaches into cloudpickle through ``cloudpickle_internals()`` alone. When a
cloudpickle release renames or changes those names, the cache quietly stops caching; these
tests make that visible, so the function can be fixed against the new release.
"""

from __future__ import annotations

import collections
import os.path
import sys
import types
from typing import Iterator

import cloudpickle
import pytest

from mymps_magic._pickling import cloudpickle_internals


@pytest.fixture
def module_by_value() -> Iterator[types.ModuleType]:
    """A module registered for pickling by value, with one function; unregistered after."""
    module = types.ModuleType("mymps_contract_module")
    exec("def helper():\n    return 1\n", module.__dict__)
    sys.modules[module.__name__] = module
    cloudpickle.register_pickle_by_value(module)
    try:
        yield module
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        del sys.modules[module.__name__]


def test_the_private_names_are_still_there() -> None:
    internals = cloudpickle_internals()
    assert internals.by_value_modules is cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES
    assert internals.pickled_by_reference is cloudpickle.cloudpickle._should_pickle_by_reference


def test_registering_a_module_by_value_is_counted(module_by_value: types.ModuleType) -> None:
    assert module_by_value.__name__ in cloudpickle_internals().by_value_modules
    cloudpickle.unregister_pickle_by_value(module_by_value)
    assert module_by_value.__name__ not in cloudpickle_internals().by_value_modules
    cloudpickle.register_pickle_by_value(module_by_value)


def test_importable_functions_and_classes_go_by_reference() -> None:
    by_reference = cloudpickle_internals().pickled_by_reference
    assert by_reference(os.path.join)
    assert by_reference(collections.OrderedDict)


def test_local_and_registered_functions_go_by_value(module_by_value: types.ModuleType) -> None:
    def local() -> int:
        return 1

    by_reference = cloudpickle_internals().pickled_by_reference
    assert not by_reference(local)
    assert not by_reference(module_by_value.helper)
