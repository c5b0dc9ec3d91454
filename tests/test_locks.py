"""The test venvs' locks (locks/, written by `make lock`) against their inputs: setup.cfg's ranges
and the Makefile's pins; and the venv running the tests against its lock."""

import configparser
import importlib.metadata
import re
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "locks"
MAKEFILE = (ROOT / "Makefile").read_text()
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def make_variable(name):
    (value,) = re.findall(rf"^{name} [?:]?= (.*)$", MAKEFILE, re.M)
    return value.strip()


def read_lock(path):
    """{name: release} of a lock, after checking that every requirement in it is pinned exactly and hashed."""
    text = path.read_text()
    requirements = [line for line in text.splitlines() if line and not line.startswith((" ", "#", "-"))]
    loose = [line for line in requirements if not PIN.match(line)]
    assert not loose, f"{path.name}: requirements without an exact pin: {loose}"
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    unhashed = [block.split()[0] for block in blocks if PIN.match(block) and "--hash=sha256:" not in block]
    assert not unhashed, f"{path.name}: pins without a hash: {unhashed}"
    return {canonicalize_name(m[1]): m[2] for m in map(PIN.match, requirements)}


def setup_cfg_requirements(extra=None):
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    value = config["options.extras_require"][extra] if extra else config["options"]["install_requires"]
    return [Requirement(line) for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


OLDER = make_variable("OLDER_TRANSFORMERS").split()
TEST_LOCKS = ["venv.txt", *(f"venv-transformers-{version}.txt" for version in OLDER)]


def test_locks_are_the_makefiles_venvs_and_no_others():
    expected = {"uv.txt", "venv-vllm.txt", *TEST_LOCKS}
    assert {path.name for path in LOCKS.glob("*.txt")} == expected, "run make lock"
    for name in expected:
        assert "#    make lock" in (LOCKS / name).read_text(), f"{name} was not written by make lock"


@pytest.mark.parametrize("name", [*TEST_LOCKS, "venv-vllm.txt"])
def test_lock_agrees_with_setup_cfg_and_the_makefile(name):
    pinned = read_lock(LOCKS / name)
    wanted = setup_cfg_requirements() + (setup_cfg_requirements("test") if name != "venv-vllm.txt" else [])
    wanted += [Requirement(r.strip("'")) for r in make_variable("BUILD").split()]  # the build backend
    wanted += [Requirement(make_variable("TORCH")), Requirement("pytest>=8")]
    if name == "venv-vllm.txt":
        wanted += [Requirement(make_variable("VLLM")), Requirement(make_variable("VLLM_TRANSFORMERS"))]
    else:
        match = re.fullmatch(r"venv-transformers-(.*)\.txt", name)
        if match:
            wanted.append(Requirement(f"transformers=={match[1]}"))
    for requirement in wanted:
        package = canonicalize_name(requirement.name)
        assert package in pinned, f"{name} lacks {requirement}"
        assert requirement.specifier.contains(pinned[package], prereleases=True), (
            f"{name} pins {package}=={pinned[package]}, outside {requirement}: run make lock"
        )


def test_vllm_lock_leaves_out_what_cannot_load_beside_cpu_torch():
    excluded = [
        line.strip()
        for line in (ROOT / "tests" / "vllm_plugin" / "excludes.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert excluded and not set(excluded) & set(read_lock(LOCKS / "venv-vllm.txt"))


def test_uv_lock_pins_the_makefiles_uv():
    assert read_lock(LOCKS / "uv.txt") == {"uv": make_variable("UV_VERSION")}


def test_version_venvs_cover_the_supported_range():
    """The oldest supported 4.x, an early 5.x, and .venv's newer than both."""
    (transformers,) = [r for r in setup_cfg_requirements() if r.name == "transformers"]
    (floor,) = [Version(s.version) for s in transformers.specifier if s.operator == ">="]
    versions = sorted(Version(v) for v in OLDER)
    assert versions[0].release[:2] == floor.release[:2], f"no venv on the oldest supported {floor}"
    assert any(v.major == 5 for v in versions), "no venv on a 5.x"
    newest = Version(read_lock(LOCKS / "venv.txt")["transformers"])
    assert newest > versions[-1]


def running_venv_lock():
    """The lock the running venv was made from, if it is one of the checkout's test venvs."""
    prefix = Path(sys.prefix).resolve()
    if prefix.parent != ROOT or not prefix.name.startswith(".venv"):
        return None
    name = prefix.name
    locks = LOCKS
    if name.startswith(".venv-latest"):  # make test-latest's scratch venvs and locks
        name, locks = ".venv" + name[len(".venv-latest") :], ROOT / ".venv-latest-locks"
    lock = locks / (name[1:] + ".txt")
    return lock if lock.exists() else None


def test_running_venv_holds_exactly_its_lock():
    lock = running_venv_lock()
    if lock is None:
        pytest.skip("not run in one of the checkout's test venvs")
    # the venv's site-packages only: not the dist-infos vendored inside a package (setuptools/_vendor,
    # which pkg_resources puts on sys.path once something imports it)
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=site)}
    installed.pop("tokendrop", None)
    locked = read_lock(lock)
    assert installed == locked, (
        f"{sys.prefix} differs from {lock.name}: "
        f"{sorted(set(installed.items()) ^ set(locked.items()))}; remove the venv's .ready and rerun make"
    )
