"""The storage layer's own promises, on fsspec's in-memory filesystem (the object-storage path, no server)."""

import gc
import os


def test_a_remote_store_stages_locally_commits_whole_and_leaves_no_scratch_folder():
    from m3t_gen.storage.store import Store

    store = Store("memory://bucket/out")
    staged = store.staging("shards/s-0000.tar")
    staged.write_bytes(b"tar bytes")
    folder = staged.parent
    assert not store.exists("shards/s-0000.tar")  # nothing visible before the commit
    store.commit("shards/s-0000.tar")
    assert store.read_bytes("shards/s-0000.tar") == b"tar bytes" and not staged.exists()
    store.staging("shards/s-0001.tar").write_bytes(b"never committed")
    del store
    gc.collect()
    assert not os.path.exists(folder)  # the scratch folder goes with the store
