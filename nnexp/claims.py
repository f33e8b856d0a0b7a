"""Claims: which process computes which example of a results directory.

Several processes may run the same command into the same directory (two terminals, a
job scheduler starting a command twice, shards of one run). Before computing an
example a process claims it: an exclusive OS file lock (flock on Unix, through
`filelock`) on `DIR/.claims/<index>.lock`. Another process that finds the claim held
leaves that example to its holder and computes the next one; when it has nothing else
to do it waits for the claim, and computes the example itself if the holder released
it without storing it (it failed, or was killed).

An OS lock dies with its process, so a killed process (kill -9, a lost machine's
kernel) never leaves a claim that blocks: there is nothing stale to recognise or clean
up. A claim file is removed once its example is stored; every claimant checks whether
the example is stored after taking the claim, so a process that took a claim on a file
being removed only finds the example done.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

WAIT_POLL_S = 0.1  # how often a waiting process tries a claim another holds


class Claim:
    """A held claim on one example; `release` it when the example is stored (or not)."""

    def __init__(self, index: int, lock: FileLock) -> None:
        self.index = index
        self._lock = lock

    def release(self, stored: bool) -> None:
        if stored:
            # Removed while still held, so no other process can be holding it (where the
            # system refuses to remove an open file, Windows, it simply stays).
            try:
                Path(self._lock.lock_file).unlink(missing_ok=True)
            except OSError:
                pass
        self._lock.release()


class Claims:
    """The claims of one results directory (`folder` is where the lock files live)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _lock(self, index: int) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        # thread_local=False: a claim is the process's, whichever thread releases it
        return FileLock(self.folder / f"{index:06d}.lock", thread_local=False)

    def try_claim(self, index: int) -> Claim | None:
        """The claim on example `index`, or None when another process holds it."""
        lock = self._lock(index)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return Claim(index, lock)

    def wait(self, index: int) -> Claim:
        """The claim on example `index`, once its holder lets it go (stored, failed or killed)."""
        lock = self._lock(index)
        lock.acquire(poll_interval=WAIT_POLL_S)
        return Claim(index, lock)
