"""qcompiler.memory: pages handed back to the system without changing a value, and the calibration engine
handing back each block's pages when it is done with the block."""

import sys

import numpy as np
import pytest
import torch

from qcompiler import CompressionConfig, compress, memory
from tests.conftest import tiny_llama

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


@linux
def test_page_out_drops_a_mapped_files_pages_and_keeps_its_values(tmp_path):
    values = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)  # 16 MB
    path = tmp_path / "weights.bin"
    values.tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=values.size, dtype=torch.float32)  # a private map
    assert float(mapped.sum()) == pytest.approx(float(values.sum()), rel=1e-4)  # every page resident
    before = _rss_file_kb()
    done = memory.page_out([(mapped.data_ptr(), mapped.numel() * 4)])
    if done == 0:
        pytest.skip("this kernel cannot page out (MADV_PAGEOUT is Linux 5.4+)")
    assert done >= values.nbytes - 2 * 4096  # whole pages inside the region
    assert _rss_file_kb() < before - 8 * 1024  # most of the 16 MB left the resident set
    assert np.array_equal(mapped.numpy(), values)  # read back from the file


@linux
def test_page_out_leaves_anonymous_memory_alone():
    values = torch.randn(4 << 20)
    copy = values.clone()
    assert memory.page_out([(values.data_ptr(), values.numel() * 4)]) == 0
    assert torch.equal(values, copy)


@pytest.mark.parametrize("options, forwards", [({"gptq": True}, 2 * 2),  # GPTQ's sweep runs each block twice
                                               ({"passes": {"autoround": {"iters": 2, "batch_size": 4}}}, 2 * 4)])
def test_the_engine_releases_each_block_after_its_last_run(options, forwards, monkeypatch):
    """A sweep, and AutoRound's own loop, hand each block back once, after the runs that need its weights."""
    from qcompiler.plugins.torch.blocks import TorchBlockExecutor

    released = []
    monkeypatch.setattr(TorchBlockExecutor, "release", lambda self, block: released.append(block.name))
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 256, (16,), generator=g) for _ in range(8)]
    result = compress(tiny_llama(), CompressionConfig(mode="int4_sym", group_size=32, dataset=samples, **options))
    assert result.calibration["block_forwards"] == forwards
    assert released == ["model.layers.0", "model.layers.1"]
