"""The allocator mode of the pipeline's processes (medfeat.engine.pipeline.malloc)."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from medfeat.engine.pipeline.config import ClusterConfig
from medfeat.errors import UnknownNameError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: 8 rounds of allocate, fill and free a 64 MiB array in a new thread
# (as the pipeline's task threads do); prints the page faults of those rounds.
_FAULTS = textwrap.dedent("""
    import resource, sys, threading
    import numpy as np
    from numpy._core.multiarray import _set_madvise_hugepage
    from medfeat.engine.pipeline.malloc import apply_malloc_mode
    _set_madvise_hugepage(False)  # count 4 KiB pages, as torch's tensors take them
    print(apply_malloc_mode(sys.argv[1]), end=" ")
    def rounds():
        a = np.ones(8 * 2**20)  # warm: the first block's pages are new in either mode
        del a
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(8):
            a = np.ones(8 * 2**20)
            del a
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=rounds)
    t.start()
    t.join()
""")


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_retain_reuses_freed_blocks_instead_of_new_pages() -> None:
    applied, system = _faults("system")
    assert applied == "False"
    assert system > 8 * 16384 * 0.9  # 8 x 64 MiB of fresh 4 KiB pages: glibc mmaps and unmaps each block
    applied, retained = _faults("retain")
    assert applied == "True"
    assert retained < system / 20  # the freed block is served again: its pages are already there


def test_unknown_malloc_mode_is_refused() -> None:
    with pytest.raises(UnknownNameError, match="malloc mode 'huge'"):
        ClusterConfig("sync", malloc="huge")
