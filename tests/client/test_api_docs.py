"""The client library documents itself (issue 12): every public class, function and method of
bpffs.client has a docstring, the operations show in dir(Client), and py.typed ships with the
package so that mypy and pyright use the hints."""

from __future__ import annotations

import importlib
import importlib.resources
import inspect
import tomllib
from pathlib import Path

import bpffs.client
from bpffs.client import calls

MODULES = ["bpffs.client", "bpffs.client.calls", "bpffs.client.codecs", "bpffs.client.maps",
           "bpffs.client.sync", "bpffs.client.aio", "bpffs.client.libbpf", "bpffs.paths",
           "bpffs.client.loader", "bpffs.client.loader.collection", "bpffs.client.loader.load",
           "bpffs.client.loader.elf"]
ROOT = Path(__file__).resolve().parents[2]


def _public(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [n for n in vars(module) if n[0] != "_"]
    found = []
    for name in names:
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if not getattr(obj, "__module__", "").startswith("bpffs.client"):
            continue  # re-exported from bpffs.vm (MapType, BpfError ...): documented there
        if module_name != "bpffs.client" and obj.__module__ != module_name:
            continue  # imported from a sibling: checked there
        found.append((f"{obj.__module__}.{obj.__qualname__}", obj))
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr[0] == "_":
                    continue
                if isinstance(member, staticmethod | classmethod):
                    member = getattr(obj, attr)  # bound: getdoc finds inherited docstrings
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member) or inspect.ismethod(member):
                    found.append((f"{obj.__module__}.{obj.__qualname__}.{attr}", member))
    return found


def test_every_public_callable_has_a_docstring() -> None:
    walked = {name: obj for module in MODULES for name, obj in _public(module)}
    assert len(walked) > 100, "the walk found the API"
    for name in ("bpffs.client.maps.Map.update", "bpffs.client.sync.Client",
                 "bpffs.client.loader.collection.load_object", "bpffs.client.libbpf.obj_pin"):
        assert name in walked
    # methods may inherit their base's docstring (Codec.encode for IntCodec.encode)
    missing = sorted(name for name, obj in walked.items() if not inspect.getdoc(obj))
    assert missing == [], f"{len(missing)} public callables have no docstring: {missing}"


def test_client_operations_are_documented_and_listed() -> None:
    for name, operation in calls.OPERATIONS.items():
        assert inspect.getdoc(operation), f"calls.{name} has no docstring"
    client_class = bpffs.client.Client
    assert "timeout" in client_class.__doc__ and "ETIMEDOUT" in client_class.__doc__
    assert "async with AsyncClient" in bpffs.client.AsyncClient.__doc__ + (
        importlib.import_module("bpffs.client.aio").__doc__ or "")


def test_dir_of_a_client_lists_its_operations(client) -> None:
    assert {"map_create", "map_lookup_elem", "obj_pin", "prog_test_run"} <= set(dir(client))


def test_type_checkers_see_every_operation() -> None:
    """Client and AsyncClient declare each operation's signature for type checkers (under
    TYPE_CHECKING; __getattr__ makes them at run time): none may be missing."""
    for cls in (bpffs.client.Client, bpffs.client.AsyncClient):
        source = inspect.getsource(cls)
        for name, operation in calls.OPERATIONS.items():
            params = list(inspect.signature(operation).parameters)[1:]  # after session
            declared = f"def {name}(self" + (f", {params[0]}" if params else ")")
            assert declared in source, f"{cls.__name__} does not declare {name}({params})"


def test_py_typed_ships_with_the_package() -> None:
    assert (importlib.resources.files("bpffs.client") / "py.typed").is_file()
    with open(ROOT / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["bpffs.client"]
