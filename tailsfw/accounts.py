"""The account database, followed live.

`parse_passwd` (pure) reads passwd text the way glibc's `files` service
does, strictly; `AccountsSource` re-reads the file whenever its directory
says it changed (useradd and adduser replace it by rename) and yields the
whole database (name -> uid) whenever it differs.

Why the file and not `pwd.getpwnam`: on Tails every account is in
`/etc/passwd` (nsswitch `passwd: files systemd`; nss-systemd adds only
root, nobody, which are in the file too, and dynamic service users, which
no policy names).  Reading the file makes the trigger and the truth the
same thing: a change in another NSS source would never fire the watch, and
an NSS module could block the event loop (LDAP, ...).  It also makes the
source injectable (a passwd in a temp directory) and the parser pure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import MappingProxyType

from . import safefile

TYPE_CHECKING = False
if TYPE_CHECKING:  # the source's, imported when it runs: tailsfwctl reads the file only
    import asyncio

    from .events import AccountsChanged


PASSWD = Path("/etc/passwd")
MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid"
MAX_BYTES = 16 * 1024 * 1024  # Tails' is 2 KiB; beyond this it is not an account database


def parse_passwd(data: bytes) -> dict[str, int]:
    """Account name -> uid for every account `data` defines, in its order.

    The first line naming an account decides, as with glibc; if that line
    is malformed (a uid that is not a plain decimal number in range, too
    few fields, a NUL), the account counts as absent rather than taking a
    later line's uid, so this never gives a uid that the system's own
    lookup would not.
    """
    uids: dict[str, int] = {}
    decided: set[bytes] = set()
    for raw in data.split(b"\n"):
        line = raw.lstrip()  # glibc skips leading blanks, blank lines, comments
        if not line or line.startswith(b"#"):
            continue
        name, _, rest = line.partition(b":")
        if name in decided:
            continue
        decided.add(name)
        uid = _uid(line, rest)
        if uid is not None:
            uids[name.decode(errors="replace")] = uid
    return uids


def _uid(line: bytes, rest: bytes) -> int | None:
    fields = rest.split(b":", 5)  # passwd, uid, gid, gecos, home, shell (may hold ':')
    # glibc cuts a line at a NUL, then uses what is left or skips the line for a
    # later one (tests/local/test_passwd_nul.py): absent is never a uid it would not give.
    if b"\0" in line or len(fields) < 6:
        return None
    uid = fields[1]
    # Plain digits only, and few of them before int(): no sign, no blanks, no 5,000 digits.
    if not (uid.isdigit() and uid.isascii() and len(uid) <= 10):
        return None
    value = int(uid)
    return value if value <= MAX_UID else None


def read_passwd(path: Path) -> bytes:
    """The file's bytes; b"" if it does not exist (then no account exists).

    Opened without blocking (a FIFO put there does not hang the daemon),
    and only a regular file of bounded size is read (safefile.read_regular).
    """
    try:
        return safefile.read_regular(path, MAX_BYTES)
    except FileNotFoundError:
        return b""


def read_uids(passwd: Path = PASSWD) -> Mapping[str, int]:
    """Account name -> uid for every account in `passwd` now (OSError if unreadable)."""
    return MappingProxyType(parse_passwd(read_passwd(passwd)))


class AccountsSource:
    """The account database: the whole of it first, then again on every change.

    Every account is reported, not only the policy's: the policy picks the
    ones it names (tailsfw.desired), so a reload needs no lookup of its own
    and nothing flows back to this source.
    """

    name = "accounts"

    def __init__(self, passwd: Path = PASSWD) -> None:
        self.passwd = passwd
        self.last_error = ""

    async def events(self) -> AsyncIterator[AccountsChanged]:
        import asyncio
        import logging

        from .events import AccountsChanged

        wake: asyncio.Queue[None] = asyncio.Queue()
        watch = asyncio.create_task(self._watch(wake), name="accounts-watch")
        last: Mapping[str, int] | None = None
        try:
            while True:
                await wake.get()
                while not wake.empty():  # one read for all that woke us meanwhile
                    wake.get_nowait()
                try:
                    uids = read_uids(self.passwd)
                except OSError as e:
                    # Keep what is in force; the next change of the file retries.
                    self.last_error = str(e)
                    logging.getLogger(__name__).error("accounts: %s: keeping the last uids", e)
                    continue
                self.last_error = ""
                if uids != last:
                    last = uids
                    yield AccountsChanged(uids)
        finally:
            watch.cancel()

    async def _watch(self, wake: asyncio.Queue[None]) -> None:
        # The watch is set up before the read it triggers first, so no
        # change falls between the two.
        from .inotify import watch_paths

        async for _ in watch_paths([self.passwd]):
            wake.put_nowait(None)
