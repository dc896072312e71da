"""glibc malloc settings for XLA:CPU processes, applied by re-executing the entry point once.

glibc hands every allocation above 32 MiB to the kernel with mmap and returns it with munmap when freed. XLA:CPU
allocates a step's temporaries afresh on every step, so each step maps them anew and pays one page fault (the
kernel zeroing a 4 KiB page) per page touched: on `configs/clip.py:bench` 589,000 faults (2.4 GB) per step, a sixth
of the step's time. The settings below make freed memory stay in the process for the next step (no page faults;
`benchmarks/train_step.py` reports `minor_page_faults_per_step`). They must be set before the process starts
(glibc reads `GLIBC_TUNABLES` at load time), hence the re-exec.

Applied only where it helps: Linux with glibc, no GPU or TPU visible (accelerator runs allocate on the device), and
not turned off with `VLP_HOST_MALLOC=default`. A `GLIBC_TUNABLES` the user set is kept and extended.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

# One arena (every thread allocates from the main heap), never mmap (large blocks come from that heap too) and never
# trim (freed memory stays for the next step). The process keeps its peak heap for its lifetime, as a trainer does.
MALLOC_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                   "glibc.malloc.trim_threshold=1099511627776")
OPT_OUT_ENV = "VLP_HOST_MALLOC"  # "default": keep glibc's own settings
_REEXECUTED_ENV = "VLP_HOST_MALLOC_APPLIED"
ACCELERATOR_DEVICE_FILES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0")  # NVIDIA GPU; TPU (v4+, v2/v3)


def accelerator_visible(environ: Mapping[str, str]) -> bool:
    """Whether JAX would likely pick a GPU/TPU here: JAX_PLATFORMS names one, or the device files of one exist."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    return any(os.path.exists(path) for path in ACCELERATOR_DEVICE_FILES)


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing should change (see the module docstring)."""
    if environ.get(OPT_OUT_ENV, "") == "default" or environ.get(_REEXECUTED_ENV):
        return None
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or accelerator_visible(environ):
        return None
    current = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in current}
    added = [t for t in MALLOC_TUNABLES if t.split("=", 1)[0] not in names]  # the user's own values win
    if not added:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(current + added)
    env[_REEXECUTED_ENV] = "1"
    return env


def reexec_with_malloc_tunables(environ: Mapping[str, str] = os.environ) -> None:
    """Replaces this process by the same command line with `MALLOC_TUNABLES` set, when `tuned_environment` says so.

    Call it first thing under `if __name__ == "__main__":` of an entry point (never from code a test imports): the
    process id, arguments and working directory stay; only the environment gains the settings.
    """
    env = tuned_environment(environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
