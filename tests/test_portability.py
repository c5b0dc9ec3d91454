"""Issue 27, installs and portability: nothing POSIX-only on the import path (the output
folder lock is filelock's), and the machine's memory from psutil rather than /proc."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from tokendrop import measure
from tokendrop.checks import UsageError
from tokendrop.files import locked


def test_a_held_lock_refuses_a_second_holder_until_released(tmp_path):
    lock = tmp_path / "records.rank0.lock"
    with locked(lock, "busy now"):
        with pytest.raises(UsageError, match="busy now"), locked(lock, "busy now"):
            pass
    with locked(lock, "busy now"):  # free again once the first block ended
        pass


def test_the_sweep_and_its_lock_import_without_fcntl(tmp_path):
    """As on Windows, where there is no fcntl: the sweep imports, and its lock still refuses a
    second holder."""
    code = (
        "import sys\nsys.modules['fcntl'] = None\n"  # `import fcntl` now fails, as on Windows
        "import tokendrop.eval.sweep, tokendrop.training\n"
        "from tokendrop.files import locked\n"
        f"lock = {str(tmp_path / 'x.lock')!r}\n"
        "with locked(lock, 'busy'):\n"
        "    try:\n"
        "        with locked(lock, 'busy'):\n"
        "            print('NOT REFUSED')\n"
        "    except ValueError:\n"
        "        print('REFUSED')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["REFUSED"], result.stderr[-2000:]


def test_a_cpu_memory_limit_is_checked_against_the_machines_memory_from_psutil(monkeypatch):
    monkeypatch.setattr(measure.psutil, "virtual_memory", lambda: SimpleNamespace(total=4 * measure.GIB))
    measure.check_cpu_limit(3 * measure.GIB)
    with pytest.raises(UsageError, match=r"above this machine's memory \(4\.0 GiB\)"):
        measure.check_cpu_limit(5 * measure.GIB)
