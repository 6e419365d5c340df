"""`python -m tests.interpret [pytest args]`: the Triton interpreter tests in a process of their
own, where a CUDA device took the main test process (see tests/conftest.py). Runs pytest on the
`triton_interpret` tests with TRITON_INTERPRET=1 and the GPU hidden; the `-m` expression given
is combined with that marker. Without a CUDA device the main process already ran them, and this
says so and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import cuda_device_present


def main(argv: list[str]) -> int:
    if not cuda_device_present() or os.environ.get("TRITON_INTERPRET") == "1":
        print("tests.interpret: no CUDA device here: the interpreter tests ran in the main "
              "pytest process")  # fmt: skip
        return 0
    marker = "triton_interpret"
    rest = list(argv)
    if "-m" in rest:
        i = rest.index("-m")
        marker = f"triton_interpret and ({rest[i + 1]})"
        del rest[i : i + 2]
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    print(f"tests.interpret: running -m {marker!r} with TRITON_INTERPRET=1, GPU hidden")
    return subprocess.call([sys.executable, "-m", "pytest", "-m", marker, *rest], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
