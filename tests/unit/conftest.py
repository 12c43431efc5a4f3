"""pyroute2 is a dev dependency only (it checks our own rtnetlink decoder):
Debian's package build runs the unit tests on Debian's Python without it."""

import importlib.util

NEED_PYROUTE2 = ["test_netlink_decode.py", "test_daemon_netlink.py"]
collect_ignore = [] if importlib.util.find_spec("pyroute2") else NEED_PYROUTE2
