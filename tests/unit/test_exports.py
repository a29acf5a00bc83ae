"""The public surface: ``stream2llm.__all__`` is what the package exports and what README uses.

In the style of httpx's ``test_exported_members``: a name missing from ``__all__`` (``EngineDied``
was) is missing from ``from stream2llm import *`` and from the documented API.
"""

from __future__ import annotations

import inspect

import stream2llm
from stream2llm import errors
from tests.readme_blocks import names_imported_from, python_blocks


def test_every_name_in_all_is_importable_and_defined_where_it_says():
    namespace: dict[str, object] = {}
    exec("from stream2llm import *", namespace)  # the star import itself is under test
    for name in stream2llm.__all__:
        value = getattr(stream2llm, name)
        assert namespace[name] is value
        assert getattr(value, "__name__", name) == name, f"{name} is re-exported under another name"


def test_all_is_sorted_without_duplicates():
    assert stream2llm.__all__ == sorted(set(stream2llm.__all__))


def test_public_module_members_are_in_all():
    # the names imported at the top (the errors; not helpers such as ``Any``) and the lazy ones
    public = {
        name
        for name, value in vars(stream2llm).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and getattr(value, "__module__", "").startswith("stream2llm")
    }
    public |= set(stream2llm._LAZY)
    assert sorted(public - set(stream2llm.__all__)) == []


def test_every_error_is_exported():
    names = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.StreamError)
    }
    assert sorted(names - set(stream2llm.__all__)) == []


def test_readme_examples_import_only_exported_names():
    blocks = python_blocks()
    assert blocks, "README.md has no Python examples"
    used = set().union(*(names_imported_from(code, "stream2llm") for _, code in blocks))
    assert used, "no README example imports from stream2llm"
    assert sorted(used - set(stream2llm.__all__)) == []
