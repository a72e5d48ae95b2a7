"""A node of the simulated cluster (tests/test_multinode.py) that does not see one folder of this machine.

Python runs `sitecustomize` at start-up from the first folder on its path that has one. The simulated node
whose environment has this folder on PYTHONPATH and RAYTUNE_TEST_HIDE=<folder> (its raylet's environment,
which every worker and agent of the node inherits) runs this in each of its Python processes: the process
moves to a mount namespace of its own and mounts an empty tmpfs over <folder>. The path exists there, and is
empty: as on a cluster node that lacks the shared volume and has a local folder where it should be mounted.
Other processes of the machine (the driver, the other nodes) see the real folder. The kernel does the
hiding; nothing in raytune_app knows about it. Needs CAP_SYS_ADMIN (root); without it the process prints
why and sees the real folder, and the test that relies on the hiding fails on its own assertions.
"""

import os

_HIDDEN = os.environ.get("RAYTUNE_TEST_HIDE")
if _HIDDEN:
    import ctypes
    import sys

    _CLONE_NEWNS, _MS_REC, _MS_PRIVATE = 0x00020000, 0x4000, 1 << 18
    _libc = ctypes.CDLL(None, use_errno=True)
    # Private propagation first, so the tmpfs mounted next stays inside this process's namespace.
    if (
        _libc.unshare(_CLONE_NEWNS) != 0
        or _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0
        or _libc.mount(b"tmpfs", _HIDDEN.encode(), b"tmpfs", 0, b"size=1m") != 0
    ):
        sys.stderr.write(f"node_view: could not hide {_HIDDEN}: {os.strerror(ctypes.get_errno())}\n")
