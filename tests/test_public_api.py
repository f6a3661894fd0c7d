from __future__ import annotations

import inspect

import aiofdpass


def test_all_is_complete_and_importable() -> None:
    public = {
        name
        for name, obj in vars(aiofdpass).items()
        if not name.startswith("_")
        and not inspect.ismodule(obj)
        and name != "annotations"
    }
    assert public == set(aiofdpass.__all__) - {"__version__"}
    for name in aiofdpass.__all__:
        assert getattr(aiofdpass, name) is not None


def test_every_public_name_has_a_docstring() -> None:
    for name in aiofdpass.__all__:
        obj = getattr(aiofdpass, name)
        if name == "__version__":
            continue
        assert inspect.getdoc(obj), name
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                target = member.fget if isinstance(member, property) else member
                if callable(target) or isinstance(member, classmethod | property):
                    assert inspect.getdoc(getattr(obj, attr)), f"{name}.{attr}"


def test_public_objects_present_as_aiofdpass() -> None:
    assert aiofdpass.FdChannel.__module__ == "aiofdpass"
    assert repr(aiofdpass.ProtocolError("x")).startswith("ProtocolError")
