"""Seeds derive from the sample key, so a re-run (or a retry on another actor) repeats exactly."""

import hashlib


def derive_seed(run_seed: int, stage: str, key: str, attempt: int = 0) -> int:
    digest = hashlib.sha256(f"{run_seed}:{stage}:{key}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
