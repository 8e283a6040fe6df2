"""Shared fixtures.

Benchmark scripts: ``benchmarks/*.py`` are scripts, not a package; :func:`benchmark_script`
imports one by file name for the tests of the pieces whose numbers the benchmark pages quote.

Hub fixtures: a Hub-compatible server on loopback (:mod:`hub_server`) and clean environments
for subprocesses. huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the cache
location once, at import, so in this process tests pass ``endpoint=`` explicitly, and code
that has no such argument (``timm.create_model('hf-hub:...')``, ``load_model('org/name')``)
runs in a subprocess started with :func:`hub_env`.

Threads: several tests train a tiny backdoored model in-process and assert on what training
left (ASR above a floor, a scan verdict). The thread count changes the order of float
reductions, so it is set once here, for every test module and whichever subset runs, rather
than by each module at import, where the last module collected silently won.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hub_server import HubServer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def benchmark_script() -> Iterator[Callable[[str], ModuleType]]:
    """``benchmark_script("run")`` imports ``benchmarks/run.py``; unregistered again afterwards."""
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while being built
        loaded.append(spec.name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """A running :class:`HubServer` shared by the session; ``.endpoint`` is its URL."""
    with pytest.MonkeyPatch.context() as mp:
        # a proxy configured in the environment must never see loopback traffic
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        mp.setenv("NO_PROXY", no_proxy)
        with HubServer() as server:
            yield server


@pytest.fixture(scope="session")
def hub_env(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, str]]:
    """Build the environment of a subprocess using the Hub.

    ``hub_env(endpoint, home=..., offline=False)`` returns ``os.environ`` without any ``HF_*``
    variable or token, plus ``HF_ENDPOINT`` (if given), a private ``HF_HOME`` / ``HF_HUB_CACHE``
    (``home``, default a fresh temporary folder), no telemetry or progress bars, and
    ``HF_HUB_OFFLINE=1`` when ``offline``.
    """

    def make(endpoint: str | None, *, home: Path | None = None, offline: bool = False) -> dict[str, str]:
        home = Path(home) if home is not None else tmp_path_factory.mktemp("hf_home")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
        env.update(
            HF_HOME=str(home),
            HF_HUB_CACHE=str(home / "hub"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
            NO_PROXY=",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
        )
        if endpoint is not None:
            env["HF_ENDPOINT"] = endpoint
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        return env

    return make
