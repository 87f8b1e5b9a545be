"""The Triton RMSNorm's optional packages: a missing or mismatched one names the versions and the fix."""

import pytest

from jaxlayouts.layout import InvalidInput, validate


def test_triton_without_its_packages_names_the_extra(monkeypatch):
    import importlib.metadata

    from conftest import make_run

    def version(name):
        if name in ("jax-triton", "triton"):
            raise importlib.metadata.PackageNotFoundError(name)
        return "0.11.2"
    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(InvalidInput) as error:
        validate(make_run("dp=1", norm="triton"), 1, platform="gpu")
    assert "pip install 'jaxlayouts[gpu]'" in str(error.value)


@pytest.mark.parametrize("versions, requires, fragments", [
    ({"jax": "0.11.2", "jax-triton": "0.4.1", "triton": "3.6.0"},  # the H200 image
     ["absl-py>=1.4.0", "jax>=0.11.0", "triton>=3.7", 'pytest; extra == "tests"'],
     ["jax-triton 0.4.1 needs triton>=3.7 (installed: 3.6.0)", "pip install 'jax-triton==0.3.1'",
      "pip install 'triton>=3.7'"]),
    ({"jax": "0.10.2", "jax-triton": "0.4.1", "triton": "3.7.0"}, ["jax>=0.11.0", "triton>=3.7"],
     ["jax-triton 0.4.1 needs jax>=0.11.0 (installed: 0.10.2)"]),
    ({"jax": "0.11.2", "jax-triton": "0.3.1", "triton": "3.6.0"}, ["jax>=0.8.2", "triton>=3.6"], None),
    ({"jax": "0.11.2", "jax-triton": None, "triton": "3.6.0"}, [],
     ["optional packages jax-triton (not installed)", "pip install 'jaxlayouts[gpu]'"]),
])
def test_triton_version_check_names_versions_and_fix(monkeypatch, versions, requires, fragments):
    import importlib.metadata

    from jaxlayouts.kernels.triton_versions import unavailable_reason

    def version(name):
        if versions[name] is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: requires)
    reason = unavailable_reason()
    if fragments is None:
        assert reason is None
    else:
        for fragment in fragments:
            assert fragment in reason
