"""The only module that talks to libnftables (Debian's python3-nftables).

One `Nftables` context is reused: the first command on a fresh context is
several times slower than the next ones.  `list_in_child` asks an `nft`
process instead, away from the event loop.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from nftables import Nftables


class NftError(RuntimeError):
    """libnftables refused a command; the message carries nft's own text."""


# "internal:0:0-0: " and the like: where in the (one-line JSON) input.
_LOCATION = re.compile(r"^\S*:\d+:\d+-\d+: ")
MAX_ERROR = 300


def error_text(stderr: str, rc: int) -> str:
    """nft's own words, on one line: its "Error:" lines, once each, without
    the echo of the input (the whole JSON document) or the caret marks."""
    errors = [_LOCATION.sub("", line.strip()) for line in stderr.splitlines()]
    words = list(dict.fromkeys(e for e in errors if "Error:" in e))
    text = "; ".join(words) or f"nft failed with code {rc}"
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


class Nft:
    def __init__(self) -> None:
        self._nft = Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)

    def apply(self, document: dict[str, Any]) -> None:
        """Run a JSON document as one transaction: all of it, or nothing."""
        # With JSON output on, libnftables reads its input as JSON too; this
        # skips json_cmd's flag toggling and output parsing (0.3 ms a call).
        rc, _, error = self._nft.cmd(json.dumps(document, separators=(",", ":")))
        if rc != 0:
            raise NftError(error_text(error, rc))

    def probe(self, table: str) -> None:
        """Commit a transaction that makes table ip `table` and deletes it
        again: nothing changes, but the commit is seen (`NftMonitor`)."""
        made = {"table": {"family": "ip", "name": table}}
        self.apply({"nftables": [{"add": made}, {"delete": made}]})

    def list_ruleset(self) -> list[dict[str, Any]]:
        rc, output, error = self._nft.cmd("list ruleset")
        if rc != 0:
            raise NftError(error_text(error, rc))
        data: dict[str, Any] = json.loads(output) if output else {"nftables": []}
        return list(data["nftables"])


async def list_in_child(nft: str = "nft") -> list[dict[str, Any]]:
    """The ruleset, listed by an `nft` child process: the loop is free
    meanwhile.  libnftables reads every link to name `iif`, under the lock
    that link changes take: during a storm of 2,000 new interfaces one
    listing took 1.4 s."""
    import asyncio  # the daemon's only: tailsfwctl starts faster without it

    child = await asyncio.create_subprocess_exec(
        nft, "-j", "list", "ruleset",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        output, error = await child.communicate()
    except BaseException:  # cancelled (a timeout): no child is left behind
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
        raise
    if child.returncode != 0:
        text = error.decode(errors="replace").strip()
        raise NftError(text or f"nft failed with code {child.returncode}")
    data: dict[str, Any] = json.loads(output) if output.strip() else {"nftables": []}
    return list(data["nftables"])


def listing_text() -> str:
    """The ruleset as nft's text, each rule followed by `# handle N`."""
    nft = Nftables()
    nft.set_handle_output(True)
    rc, output, error = nft.cmd("list ruleset")
    if rc != 0:
        raise NftError(error_text(error, rc))
    return str(output)
