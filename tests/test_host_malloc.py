"""vlp/host_malloc.py: which environment gets glibc's malloc settings, and that they remove XLA:CPU's page faults."""

import os
import platform
import subprocess
import sys

import pytest

from vlp import host_malloc

TUNED = ":".join(host_malloc.MALLOC_TUNABLES)


def test_cpu_process_gets_every_setting_and_a_marker_against_loops():
    env = host_malloc.tuned_environment({"JAX_PLATFORMS": "cpu", "PATH": "/bin"})
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        assert env is None
        return
    assert env["GLIBC_TUNABLES"] == TUNED and env["PATH"] == "/bin"
    assert host_malloc.tuned_environment(env) is None  # the re-executed process does not re-execute again


@pytest.mark.parametrize("environ", [
    {"JAX_PLATFORMS": "cuda"},  # accelerator runs allocate on the device
    {"JAX_PLATFORMS": "tpu,cpu"},
    {"JAX_PLATFORMS": "cpu", "VLP_HOST_MALLOC": "default"},  # the user's opt-out
    {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": TUNED},  # already set
])
def test_left_alone(environ):
    assert host_malloc.tuned_environment(environ) is None


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_user_tunables_are_kept_and_win():
    env = host_malloc.tuned_environment({"JAX_PLATFORMS": "cpu",
                                         "GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0"})
    assert env["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0:"
                                     + ":".join(host_malloc.MALLOC_TUNABLES[1:]))


PROBE = """
import resource, sys
from vlp.host_malloc import reexec_with_malloc_tunables
reexec_with_malloc_tunables()
import jax, jax.numpy as jnp
z = jnp.ones((8320, 1024))  # one activation of the bench ViT's MLP: 34 MB, above glibc's 32 MiB mmap threshold
f = jax.jit(lambda t: 2.0 * t + 1.0)
f(z).block_until_ready()
faults = []
for _ in range(30):  # freed buffers return asynchronously: under load the heap grew for up to 13 calls
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(z).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults), sys.argv[1:])
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_reexecuted_process_keeps_its_arguments_and_pays_no_page_faults():
    def run(extra_env):
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VLP_HOST_MALLOC_APPLIED")}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", **extra_env)
        out = subprocess.run([sys.executable, "-c", PROBE, "--flag=1", "x"], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout.split()
        return int(out[0]), " ".join(out[1:])

    tuned_faults, argv = run({})
    default_faults, _ = run({"VLP_HOST_MALLOC": "default"})
    assert argv == "['--flag=1', 'x']"
    assert default_faults > 4000  # 34 MB of fresh 4 KiB pages: ~8,300 measured
    assert tuned_faults < 200  # 0 measured
