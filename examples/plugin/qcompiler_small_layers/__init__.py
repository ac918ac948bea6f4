"""Example pass plugin: weights with fewer than `min_params` parameters go to the backup precision.

Small layers save little memory in 4-bit but can cost accuracy. Install with
`pip install -e examples/plugin`, then run it with
`qcompiler compress MODEL --weight-format int4 --small-layers-to-backup --small-layers-to-backup-min-params 100000`
or `qcompiler.compress(model, CompressionConfig(..., passes={"small_layers_to_backup": {"min_params": 100000}}))`:
the flag, the option, its help and its check come from the declarations below.
Such passes run after precision assignment (and data-free AWQ), before the passes that fit weights to
calibration data and before rounding; the backend checks the formats again after them.
"""

from dataclasses import dataclass, field

from qcompiler.hookspecs import hookimpl
from qcompiler.config import WeightFormat
from qcompiler.passmanager import Pass, PassResult


@dataclass(frozen=True)
class Options:
    min_params: int = field(default=200_000, metadata={"help": "layers with fewer parameters go to the backup "
                                                               "precision", "min": 0})


class SmallLayersToBackup(Pass):
    name = "small_layers_to_backup"
    Options = Options
    flag = "--small-layers-to-backup"
    help = "keep small layers in the backup precision"

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
