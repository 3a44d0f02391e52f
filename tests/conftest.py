import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# One thread per process: tests start training subprocesses (torchrun starts two), and on a small
# machine several processes with several threads each oversubscribe the cores badly.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# No run pictures (curves.png, alignment.png): ~0.5 s of CPU per run, over a fifth of the suite's
# in-process time; the tests of those pictures turn them back on (`run_pictures` fixture).
os.environ["FA_RULES_RUN_PICTURES"] = "0"

# Tests never download: loaders must use files the tests write, or fail with one clear line.
os.environ["FA_RULES_OFFLINE"] = "1"
os.environ.setdefault("FA_RULES_DATA_DIR", os.path.join(os.path.dirname(__file__), ".data-unused"))

# FID's cache of real-image features goes to a throw-away folder, not the user's home.
if "FA_RULES_FID_CACHE" not in os.environ:
    os.environ["FA_RULES_FID_CACHE"] = tempfile.mkdtemp(prefix="fa-rules-fid-cache-")


# -- the example plugins, found through real entry-point discovery -----------------------------------
# `pip install -e ".[test]"` does not install examples/*-plugin, yet tests train with their rule and
# model. Each gets a temporary distribution: a *.dist-info holding the entry points its pyproject.toml
# declares, put first on sys.path beside the plugin's source folder, so importlib.metadata finds it
# exactly as it finds a pip-installed one (and the repository's source wins over an installed copy).
# PYTHONPATH carries the same folders to the CLI and torchrun subprocesses the tests start.
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _install_example_plugins() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
        import tomli as tomllib

    site = tempfile.mkdtemp(prefix="fa-rules-example-plugins-")
    atexit.register(shutil.rmtree, site, ignore_errors=True)
    paths = [site]
    for project in sorted(EXAMPLES.glob("*-plugin")):
        meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
        name, version = meta["name"], meta["version"]
        dist_info = Path(site) / f"{name.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        points = "".join(f"{k} = {v}\n" for k, v in meta["entry-points"]["fa_rules"].items())
        (dist_info / "entry_points.txt").write_text(f"[fa_rules]\n{points}")
        paths.append(str(project))
    return paths


_PLUGIN_PATHS = _install_example_plugins()
sys.path[:0] = _PLUGIN_PATHS
os.environ["PYTHONPATH"] = os.pathsep.join([*_PLUGIN_PATHS, *filter(None, [os.environ.get("PYTHONPATH")])])


# -- optional packages the [test] extra cannot carry ---------------------------------------------------
# `@pytest.mark.needs_package(name, install, module=... or path=...)`: without the module (or the
# folder a system package installs) the test skips with one line saying how to install it. CI installs
# every such package and sets FA_RULES_REQUIRE_OPTIONAL=1, which turns that skip into a failure.
REQUIRE_OPTIONAL_ENV = "FA_RULES_REQUIRE_OPTIONAL"


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_package(name, install, module=None, path=None): skip (fail under "
                            f"{REQUIRE_OPTIONAL_ENV}=1) when the module or folder is missing")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_package"):
        name, install = mark.args
        module, path = mark.kwargs.get("module"), mark.kwargs.get("path")
        present = importlib.util.find_spec(module) is not None if module else Path(path).is_dir()
        if not present:
            reason = f"needs {name}, which the [test] extra cannot carry: {install}"
            if os.environ.get(REQUIRE_OPTIONAL_ENV) == "1":
                pytest.fail(f"{reason} ({REQUIRE_OPTIONAL_ENV}=1: CI installs it)", pytrace=False)
            pytest.skip(reason)



@pytest.fixture
def run_pictures(monkeypatch):
    """Runs draw curves.png and alignment.png, as they do for users (CLI subprocesses too)."""
    monkeypatch.setenv("FA_RULES_RUN_PICTURES", "1")


# The longest modules start first: `--dist loadscope` hands whole modules to the workers in collection
# order, and one of these started last would leave the other worker idle at the end (tens of seconds).
LONGEST_FIRST = ("test_distributed.py", "test_benchmark_workers.py", "test_generative_measures.py",
                 "test_benchmark_hardening.py", "test_rule_costs.py", "test_benchmark_ray.py", "test_cli_errors.py",
                 "test_conformance.py", "test_train_cli.py", "test_resume_randomness.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
