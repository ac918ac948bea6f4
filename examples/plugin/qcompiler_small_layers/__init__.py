"""Example pass plugin: weights with fewer than `min_params` parameters go to the backup precision.

Small layers save little memory in 4-bit but can cost accuracy. Install with
`pip install -e examples/plugin`, then run it with
`qcompiler.compress(model, CompressionConfig(..., extra_passes=("small_layers_to_backup",)))`.
Extra passes run after precision assignment (and AWQ), before the weights are rewritten.
"""

from dataclasses import dataclass

from qcompiler.hookspecs import hookimpl
from qcompiler.config import WeightFormat
from qcompiler.passmanager import Pass, PassResult


@dataclass(frozen=True)
class Options:
    min_params: int = 200_000


class SmallLayersToBackup(Pass):
    name = "small_layers_to_backup"
    Options = Options

    def run(self, graph, ctx):
        backup = ctx.config.backup_mode.mode
        moved = []
        for const in graph.weight_constants():
            if const.meta.get("role") == "primary" and graph.weight(const).numel() < self.options.min_params:
                const.meta["format"] = WeightFormat(backup, -1) if backup else None
                const.meta["role"] = "backup"
                moved.append(const.name)
        return PassResult(bool(moved), {"moved_to_backup": moved})


@hookimpl
def qcompiler_register_passes():
    return [SmallLayersToBackup]
