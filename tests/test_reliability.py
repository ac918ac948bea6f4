"""The promises qcompiler keeps with a user's files, code and input (README, "Safety").

Read the test names as the list. A tiny random LLaMA and the torch backend keep them fast; the
few that need a process of their own (a kill in the middle of the swap, SIGTERM, Ctrl-C, stdin,
two writers at once) run the command line as a subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qcompiler.cli import main
from qcompiler.output import MARKER, STAGING_MARKER, OutputFolder
from tests.conftest import WIKITEXT, tiny_llama, tiny_tokenizer

TINY = ["--backend", "torch", "--weight-format", "int4", "--sym", "--group-size", "32", "--quiet"]
QCOMPILER = str(Path(sys.executable).parent / "qcompiler")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def work(tmp_path, model_dir, monkeypatch) -> Path:
    """A working folder holding a copy of the model (`M`) and a user's file, the current folder."""
    shutil.copytree(model_dir, tmp_path / "M")
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def one_line(err: str) -> str:
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def snapshot(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".qcompiler"))


def is_complete_artifact(folder: Path) -> bool:
    listed = set(json.loads((folder / MARKER).read_text())["files"])
    present = {p.name for p in folder.iterdir()} - {MARKER}
    return listed == present and "qcompiler_report.json" in present


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails loudly: an output error seen instead proves it came before any work."""
    from qcompiler.plugins.torch import TorchFrontend

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(TorchFrontend, "load", refuse)


# ---------------------------------------------------------------- the output location


def _existing_foreign(work):
    (work / "theirs").mkdir()
    (work / "theirs" / "data.bin").write_bytes(b"1234")
    return ["-o", "theirs", "--overwrite"]


def _ours_plus_a_user_file(work):
    folder = work / "ours"
    folder.mkdir()
    (folder / "qcompiler_report.json").write_text("{}")
    (folder / MARKER).write_text(json.dumps({"files": ["qcompiler_report.json"]}))
    (folder / "my-notes.txt").write_text("added by the user")
    return ["-o", "ours", "--overwrite"]


def _symlink(work):
    (work / "real").mkdir()
    (work / "real" / "x").write_text("x")
    (work / "link").symlink_to(work / "real")
    return ["-o", "link", "--overwrite"]


def _home(work, monkeypatch):
    (work / "home").mkdir()
    monkeypatch.setenv("HOME", str(work / "home"))
    return ["-o", "~", "--overwrite"]


OUTPUT_CASES = {
    "the current folder": (lambda w, m: ["-o", ".", "--overwrite"], "is the current folder"),
    "a folder above the current one": (lambda w, m: ["-o", "..", "--overwrite"], "is the current folder or one above"),
    "the root folder": (lambda w, m: ["-o", "/", "--overwrite"], "is not a folder name"),
    "the home folder": (_home, "is the home or root folder"),
    "the model folder": (lambda w, m: ["-o", "M", "--overwrite"], "is the model M or a folder holding it"),
    "inside the model folder": (lambda w, m: ["-o", "M/int4"], "is inside the model folder"),
    "a folder holding the model": (lambda w, m: ["-o", str(w), "--overwrite"], "is the current folder"),
    "an empty path": (lambda w, m: ["-o", ""], "the output path is empty"),
    "a path under a file": (lambda w, m: ["-o", "notes.txt/out"], "notes.txt is a file, not a folder"),
    "a name over 255 bytes": (lambda w, m: ["-o", "x" * 300], "this filesystem allows 255"),
    "a symbolic link": (lambda w, m: _symlink(w), "is a symbolic link"),
    "an existing file": (lambda w, m: ["-o", "notes.txt", "--overwrite"], "is a file, not a folder"),
    "a folder qcompiler did not write": (lambda w, m: _existing_foreign(w), "was not written by qcompiler"),
    "an artifact a user added a file to": (lambda w, m: _ours_plus_a_user_file(w), "holds files qcompiler did not "
                                                                                      "write (my-notes.txt)"),
    "an existing folder without --overwrite": (lambda w, m: _existing_foreign(w)[:2], "already exists: pass "
                                                                                       "--overwrite"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_a_bad_output_location_is_refused_before_any_work_and_nothing_is_touched(case, work, capsys, monkeypatch,
                                                                                no_loading):
    make_argv, message = OUTPUT_CASES[case]
    argv = make_argv(work, monkeypatch)
    before = snapshot(work)
    code, err = run(["compress", "M", *argv, *TINY], capsys)
    assert code == 2 and message in one_line(err), err
    assert snapshot(work) == before


def test_a_folder_above_the_model_is_refused(work, capsys, monkeypatch, no_loading):
    (work / "models").mkdir()
    (work / "M").rename(work / "models" / "M")
    (work / "elsewhere").mkdir()
    monkeypatch.chdir(work / "elsewhere")
    before = snapshot(work)
    code, err = run(["compress", "../models/M", "-o", "../models", "--overwrite", *TINY], capsys)
    assert code == 2 and "is the model ../models/M or a folder holding it" in one_line(err)
    assert snapshot(work) == before


def test_a_read_only_location_is_refused_before_any_work(work, capsys, no_loading):
    target = work / "ro"
    target.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only mount
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                          capture_output=True).returncode != 0:
            pytest.skip("root without mount permission cannot make a read-only folder here")
    else:
        target.chmod(0o555)
    try:
        code, err = run(["compress", "M", "-o", target / "out", *TINY], capsys)
        assert code == 2 and "cannot write in" in one_line(err) and "choose another -o" in err
        assert list(target.iterdir()) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(target)], check=True)
        target.chmod(0o755)


def test_missing_parent_folders_are_created_and_removed_again_on_failure(work, capsys):
    code, err = run(["compress", "M", "-o", "a/b/out", "--group-size", "1024", *TINY[:-3], "--quiet",
                     "--sym", "--weight-format", "int4"], capsys)
    assert code == 2 and "divides none" in one_line(err)
    assert not (work / "a").exists()


# ---------------------------------------------------------------- --overwrite and atomic writes


def test_overwrite_replaces_only_a_qcompiler_artifact_and_leaves_nothing_behind(work, capsys):
    assert run(["compress", "M", "-o", "out", *TINY], capsys)[0] == 0
    (work / "out" / "qcompiler_eval.json").write_text("{}")  # what `qcompiler eval` adds
    assert run(["compress", "M", "-o", "out", "--overwrite", "--backend", "torch", "--weight-format", "int8",
                "--quiet"], capsys)[0] == 0
    report = json.loads((work / "out" / "qcompiler_report.json").read_text())
    assert report["config"]["mode"] == "int8_asym" and is_complete_artifact(work / "out")
    assert not (work / "out" / "qcompiler_eval.json").exists()
    assert leftovers(work) == [] and (work / "notes.txt").read_text() == "mine"


def test_an_existing_empty_folder_is_used(work, capsys):
    (work / "empty").mkdir()
    assert run(["compress", "M", "-o", "empty", *TINY], capsys)[0] == 0
    assert is_complete_artifact(work / "empty")


def test_a_second_writer_of_the_same_output_fails_at_once(work, capsys, no_loading):
    with OutputFolder(work / "out"):
        code, err = run(["compress", "M", "-o", "out", "--overwrite", *TINY], capsys)
    assert code == 2 and f"(pid {os.getpid()}) is writing out" in one_line(err)
    assert leftovers(work) == [] and not (work / "out").exists()


def test_two_concurrent_runs_into_one_output_one_wins_the_other_fails(work):
    cmd = [QCOMPILER, "compress", "M", "-o", "out", *TINY]
    procs = [subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert "is writing out" in results[1][1] or "already exists" in results[1][1]
    assert is_complete_artifact(work / "out") and leftovers(work) == []


KILL_SCRIPT = """
import os, signal, sys
import qcompiler.output as output
if {portable}:
    output.RENAMEAT2 = None
output.after_step = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == {step!r} else None
from qcompiler.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("step,portable", [("staged", False), ("exchanged", False), ("set-aside", True),
                                           ("renamed-in", True)])
def test_a_kill_at_any_step_of_the_swap_leaves_a_complete_artifact_and_the_next_run_cleans_up(
        step, portable, work, capsys):
    assert run(["compress", "M", "-o", "out", "--backend", "torch", "--weight-format", "int8", "--quiet"], capsys)[0] == 0
    old = snapshot(work / "out")
    argv = ["compress", "M", "-o", "out", "--overwrite", *TINY]
    script = KILL_SCRIPT.format(portable=portable, step=step, argv=argv)
    proc = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if (work / "out").exists():
        assert is_complete_artifact(work / "out")
    assert run(["compress", "M", "-o", "other", *TINY], capsys)[0] == 0  # a later run in the same folder
    assert leftovers(work) == []
    assert is_complete_artifact(work / "out")
    mode = json.loads((work / "out" / "qcompiler_report.json").read_text())["config"]["mode"]
    assert mode == ("int8_asym" if step in ("staged", "set-aside") else "int4_sym")
    if mode == "int8_asym":
        assert snapshot(work / "out") == old


SIGNAL_SCRIPT = """
import os, signal, sys
import qcompiler.output as output
if {portable}:
    output.RENAMEAT2 = None
output.after_step = lambda step: os.kill(os.getpid(), {signum}) if step == {step!r} else None
from qcompiler.cli import main
sys.exit(main({argv!r}))
"""


# each signal at one step (the same handler serves both; a step's outcome does not depend on the signal)
@pytest.mark.parametrize("signum,step,portable", [(signal.SIGINT, "exchanged", False),
                                                  (signal.SIGTERM, "set-aside", True)])
def test_a_signal_during_the_swap_waits_for_it_and_says_what_was_written(signum, step, portable, work, capsys):
    assert run(["compress", "M", "-o", "out", "--backend", "torch", "--weight-format", "int8", "--quiet"], capsys)[0] == 0
    argv = ["compress", "M", "-o", "out", "--overwrite", *TINY]
    script = SIGNAL_SCRIPT.format(portable=portable, signum=int(signum), step=step, argv=argv)
    proc = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=300,
                          preexec_fn=_sigint_default)
    assert proc.returncode == 128 + signum
    assert one_line(proc.stderr.strip()).endswith(f"interrupted by {signal.Signals(signum).name}: after writing "
                                                  f"{work / 'out'}")
    assert is_complete_artifact(work / "out") and leftovers(work) == []
    assert json.loads((work / "out" / "qcompiler_report.json").read_text())["config"]["mode"] == "int4_sym"


def test_stale_folders_of_dead_writers_are_removed_and_a_set_aside_artifact_restored(work, capsys):
    # what a writer killed between "old aside" and "new in" leaves: its journal, both folders
    key = hashlib.sha1(b"restored").hexdigest()[:12]
    aside, staging = work / f".qcompiler-old-{key}-1", work / f".qcompiler-tmp-{key}-1"
    aside.mkdir()
    (aside / MARKER).write_text(json.dumps({"files": ["w.bin"]}))
    (aside / "w.bin").write_bytes(b"old")
    staging.mkdir()
    (staging / STAGING_MARKER).write_text("{}")
    (work / f".qcompiler-lock-{key}").write_text(json.dumps(
        {"pid": 1, "target": "restored", "staging": staging.name, "aside": aside.name}))
    (work / ".qcompiler-tmp-look-alike").mkdir()  # not ours: no marker, not empty, no journal
    (work / ".qcompiler-tmp-look-alike" / "keep").write_text("user data")
    assert run(["compress", "M", "-o", "out", *TINY], capsys)[0] == 0
    assert (work / "restored" / "w.bin").read_bytes() == b"old"
    assert leftovers(work) == [".qcompiler-tmp-look-alike"]


@pytest.mark.parametrize("journal", [
    {"target": "stolen", "staging": None, "aside": "../userdir"},
    {"target": "/elsewhere/moved", "staging": None, "aside": "inside"},
    {"target": "out", "staging": "../userdir", "aside": None},
    [1, 2], "[" * 100000,
])
def test_a_forged_journal_moves_and_deletes_nothing(journal, work, capsys):
    (work / "P").mkdir()
    (work / "userdir").mkdir()
    (work / "userdir" / "thesis.tex").write_text("years of work")
    (work / "P" / "inside").mkdir()
    (work / "P" / "inside" / MARKER).write_text(json.dumps({"files": []}))
    target = journal["target"] if isinstance(journal, dict) else "x"
    lock = work / "P" / f".qcompiler-lock-{hashlib.sha1(target.encode()).hexdigest()[:12]}"
    lock.write_text(journal if isinstance(journal, str) else json.dumps(journal))
    before = snapshot(work)
    assert run(["compress", "M", "-o", work / "P" / "out", *TINY], capsys)[0] == 0
    after = snapshot(work)
    assert {k: v for k, v in before.items() if not k.startswith("P/")} == \
        {k: v for k, v in after.items() if not k.startswith("P/")}
    assert (work / "P" / "inside" / MARKER).exists()


def test_a_symlink_in_place_of_the_lock_file_is_refused_and_its_target_untouched(work, capsys):
    (work / "victim.txt").write_text("precious")
    key = hashlib.sha1(b"out").hexdigest()[:12]
    (work / f".qcompiler-lock-{key}").symlink_to(work / "victim.txt")
    code, err = run(["compress", "M", "-o", "out", *TINY], capsys)
    assert code == 2 and "is a symbolic link" in one_line(err)
    assert (work / "victim.txt").read_text() == "precious"


def test_a_malformed_marker_makes_a_folder_foreign(work, capsys):
    (work / "A").mkdir()
    (work / "A" / MARKER).write_text(json.dumps({"files": "abc"}))
    (work / "A" / "a").write_text("mine")
    code, err = run(["compress", "M", "-o", "A", "--overwrite", *TINY], capsys)
    assert code == 2 and "was not written by qcompiler" in one_line(err)
    assert (work / "A" / "a").read_text() == "mine"


# ---------------------------------------------------------------- signals


def _wait_for(predicate, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_sigterm_ends_the_run_with_143_and_nothing_written(work):
    proc = subprocess.Popen([QCOMPILER, "compress", "M", "-o", "new/out", *TINY], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (work / "new").exists() and any((work / "new").glob(".qcompiler-lock-*")))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = proc.stderr.read().strip()
    assert one_line(err) == "qcompiler: interrupted by SIGTERM: nothing was written"
    assert not (work / "new").exists() and leftovers(work) == []


def _sigint_default() -> None:
    """The child takes Ctrl-C as a terminal's foreground process does, whatever this process inherited: a
    shell's background job starts with SIGINT ignored, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("delay", [0.4, 1.5])
def test_ctrl_c_during_start_up_is_one_line_and_130(work, delay):
    proc = subprocess.Popen([QCOMPILER, "compress", "M", "-o", "out", *TINY], cwd=work, preexec_fn=_sigint_default,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    err = proc.stderr.read().strip()
    assert code == 130, err[-2000:]  # (seen once: 0, the signal lost; its stderr will say where)
    assert "Traceback" not in err and err.endswith("qcompiler: interrupted by SIGINT: nothing was written")
    assert not (work / "out").exists() and leftovers(work) == []


# ---------------------------------------------------------------- a model's code and pickles never run


def _remote_code_folder(work: Path, model_dir: Path) -> Path:
    folder = work / "custom"
    folder.mkdir()
    shutil.copy(model_dir / "model.safetensors", folder)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qcompiler_custom", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    ran = work / "code-ran"
    (folder / "configuration_custom.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(ran)!r}).write_text("the folder's code ran")
        from transformers import PretrainedConfig
        class CustomConfig(PretrainedConfig):
            model_type = "qcompiler_custom"
    """))
    (folder / "modeling_custom.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n")
    return folder


def test_a_model_folders_code_never_runs_and_stdin_is_never_read(work, model_dir):
    folder = _remote_code_folder(work, model_dir)
    proc = subprocess.run([QCOMPILER, "compress", str(folder), "-o", "out", "--quiet"], cwd=work,
                          input="y\n" * 20, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "[y/N]" not in proc.stdout
    assert "ships its own Python code (configuration_custom.py, modeling_custom.py)" in one_line(proc.stderr.strip())
    assert "--trust-remote-code" in proc.stderr
    assert not (work / "code-ran").exists() and not (work / "out").exists()


def test_trust_remote_code_is_what_lets_it_run(work, model_dir, capsys):
    folder = _remote_code_folder(work, model_dir)
    code, err = run(["compress", folder, "-o", "out", "--trust-remote-code", "--quiet"], capsys)
    assert (work / "code-ran").exists()  # the flag reaches transformers (this toy model then fails to build)
    assert code == 2 and one_line(err) and not (work / "out").exists()


def test_an_unknown_model_type_is_one_line(work, capsys):
    config = json.loads((work / "M" / "config.json").read_text())
    (work / "M" / "config.json").write_text(json.dumps({**config, "model_type": "no_such_family"}))
    code, err = run(["compress", "M", "-o", "out", *TINY], capsys)
    assert code == 2 and "model type 'no_such_family'" in one_line(err) and "upgrade transformers" in err


def _pickle_folder(work: Path, model_dir: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    folder = work / "pickled"
    folder.mkdir()
    shutil.copy(model_dir / "config.json", folder)
    torch.save(load_file(model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_need_allow_pickle(work, model_dir, capsys):
    folder = _pickle_folder(work, model_dir)
    code, err = run(["compress", folder, "-o", "out", *TINY], capsys)
    assert code == 2 and "pickle files (pytorch_model.bin)" in one_line(err) and "--allow-pickle" in err
    assert run(["compress", folder, "-o", "out", "--allow-pickle", *TINY], capsys)[0] == 0


def test_a_malicious_pickle_never_runs_even_with_allow_pickle(work, model_dir, capsys):
    import pickle

    folder = work / "evil"
    folder.mkdir()
    shutil.copy(model_dir / "config.json", folder)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {work / 'pwned'}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    code, err = run(["compress", folder, "-o", "out", "--allow-pickle", *TINY], capsys)
    assert code == 2 and "weights-only loader refused it" in one_line(err)
    assert "weights_only=False" not in err and not (work / "pwned").exists()


# ---------------------------------------------------------------- damaged files are one line


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
def test_a_damaged_safetensors_file_is_one_line(damage, work, capsys):
    weights = work / "M" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 3], "random bytes": os.urandom(5000), "empty": b""}[damage])
    code, err = run(["compress", "M", "-o", "out", *TINY], capsys)
    assert code == 2 and "is not a readable safetensors file" in one_line(err) and not (work / "out").exists()


@pytest.fixture
def ov_artifact(work, capsys) -> Path:
    assert run(["compress", "M", "-o", "ov", "--weight-format", "int8", "--quiet"], capsys)[0] == 0
    return work / "ov"


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("damage", ["truncated .bin", "garbage .xml"])
def test_a_damaged_openvino_artifact_is_one_line(command, damage, ov_artifact, capsys):
    if damage == "truncated .bin":
        path = ov_artifact / "openvino_model.bin"
        path.write_bytes(path.read_bytes()[:1000])
    else:
        (ov_artifact / "openvino_model.xml").write_text("<net><layers>garbage")
    extra = ["--prompt", "hi"] if command == "generate" else ["--text", WIKITEXT, "--no-original"]
    code, err = run([command, ov_artifact, *extra], capsys)
    assert code == 2 and "the artifact is damaged" in one_line(err)


def test_a_damaged_torch_artifact_is_one_line(work, capsys):
    assert run(["compress", "M", "-o", "pt", *TINY], capsys)[0] == 0
    (work / "pt" / "model.safetensors").write_bytes(b"\x00" * 10)
    code, err = run(["generate", work / "pt", "--prompt", "hi"], capsys)
    assert code == 2 and "the artifact is damaged" in one_line(err)


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_is_one_line_and_leaves_nothing(work, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, err = run(["compress", "M", "-o", "out", *TINY], capsys)
    assert code == 2 and "is full" in one_line(err) and "nothing was written" in err
    assert not (work / "out").exists() and leftovers(work) == []


def test_a_runtime_that_words_a_full_disk_its_own_way_is_one_line(work, capsys, monkeypatch):
    import openvino

    import qcompiler.output

    def full(*args, **kwargs):
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp: basic_ios::clear: iostream error")

    monkeypatch.setattr(openvino, "save_model", full)
    monkeypatch.setattr(qcompiler.output.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    code, err = run(["compress", "M", "-o", "out", "--weight-format", "int8", "--quiet"], capsys)
    assert code == 2 and "is full (0.0 MiB free)" in one_line(err)
    assert not (work / "out").exists() and leftovers(work) == []


def test_a_really_full_disk_is_one_line_and_leaves_nothing(work, capsys):
    disk = work / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root with mount permission")
    try:
        code, err = run(["compress", "M", "-o", disk / "out", *TINY], capsys)
        assert code == 2 and "is full" in one_line(err)
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------- options outside their meaning are refused


BAD_OPTIONS = {
    "group size not a power of two": (["compress", "M", "--weight-format", "int4", "--group-size", "7"],
                                      "group size 7 is not a power of two"),
    "huge group size": (["compress", "M", "--weight-format", "int4", "--group-size", "100000"], "is not a power of two"),
    "group size dividing no layer": (["compress", "M", "--weight-format", "int4", "--group-size", "1024"],
                                     "divides none of the 14 layers"),
    "asymmetric mode with --sym": (["compress", "M", "--weight-format", "int4_asym", "--sym"],
                                   "--sym contradicts --weight-format int4_asym"),
    "nf4 with --sym": (["compress", "M", "--weight-format", "nf4", "--sym"], "--sym applies to the integer formats only"),
    "invalid ignored-scope regex": (["compress", "M", "--ignored-scope-pattern", "(["],
                                    "--ignored-scope-pattern '([' is not a valid regular expression"),
    "window 0": (["eval", "A", "--text", WIKITEXT, "--window", "0"], "--window 0 is below 2"),
    "stride 0": (["eval", "A", "--text", WIKITEXT, "--stride", "0"], "--stride 0 is below 1"),
    "stride above window": (["eval", "A", "--text", WIKITEXT, "--window", "8", "--stride", "16"], "would skip text"),
    "max windows 0": (["eval", "A", "--text", WIKITEXT, "--max-windows", "0"], "--max-windows 0 is below 1"),
    "negative new tokens": (["generate", "A", "--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens -3"),
    "zero new tokens": (["generate", "A", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    "temperature 0": (["generate", "A", "--prompt", "x", "--sample", "--temperature", "0"], "--temperature 0.0"),
    "top-k 0": (["generate", "A", "--prompt", "x", "--sample", "--top-k", "0"], "--top-k 0 is below 1"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_an_option_outside_its_meaningful_range_is_refused(case, work, capsys):
    (work / "A").mkdir()
    argv, message = BAD_OPTIONS[case]
    if argv[0] == "compress":
        argv = [*argv, "-o", "out", "--backend", "torch", "--quiet"]
    code, err = run(argv, capsys)
    assert code == 2 and message in one_line(err), err
    assert not (work / "out").exists() and leftovers(work) == []


def test_a_group_size_that_is_not_a_power_of_two_is_accepted_when_a_fallback_is_asked_for(work, capsys):
    code, _ = run(["compress", "M", "-o", "out", "--weight-format", "int4", "--group-size", "48",
                   "--group-size-fallback", "adjust",
                   "--backend", "openvino", "--quiet"], capsys)
    assert code == 0
    assert json.loads((work / "out" / "qcompiler_report.json").read_text())["config"]["group_size"] == 48


# ---------------------------------------------------------------- the report and the messages


def test_report_paths_are_absolute_so_eval_works_from_another_folder(work, capsys, monkeypatch):
    assert run(["compress", "M", "-o", "out", *TINY], capsys)[0] == 0
    report = json.loads((work / "out" / "qcompiler_report.json").read_text())
    assert report["source"] == str((work / "M").resolve())
    (work / "elsewhere").mkdir()
    monkeypatch.chdir(work / "elsewhere")
    assert main(["eval", "../out", "--text", str(WIKITEXT), "--max-windows", "1", "--window", "32"]) == 0
    assert "original" in capsys.readouterr().out


def test_eval_names_a_missing_original_and_the_fix(work, capsys):
    assert run(["compress", "M", "-o", "out", *TINY], capsys)[0] == 0
    (work / "M").rename(work / "moved")
    code, err = run(["eval", "out", "--text", WIKITEXT, "--max-windows", "1"], capsys)
    assert code == 2 and "does not exist here: pass --original MODEL, or --no-original" in one_line(err)


def test_an_error_after_a_progress_bar_is_on_a_line_of_its_own(work, capsys):
    code, err = run(["compress", "M", "-o", "out", "--weight-format", "int4", "--group-size", "1024", "--backend", "torch"],
                    capsys)
    assert code == 2 and "%|" in err  # the progress bar was showing
    assert err.splitlines()[-1].startswith("qcompiler: error: group size 1024 divides none")


def test_quiet_shows_no_progress_bar_not_even_the_loaders(work, capsys):
    code, err = run(["compress", "M", "-o", "out", *TINY], capsys)
    assert code == 0 and "%|" not in err and "Loading weights" not in err


def test_an_unexpected_failure_is_one_line_with_exit_1(work, capsys, monkeypatch):
    import qcompiler.pipeline

    def broken(*args, **kwargs):
        raise TypeError("something qcompiler did not foresee")

    monkeypatch.setattr(qcompiler.pipeline, "build_report", broken)
    code, err = run(["compress", "M", "-o", "out", *TINY], capsys)
    assert code == 1 and "internal error" in one_line(err) and "QCOMPILER_TRACEBACK=1" in err
    assert not (work / "out").exists() and leftovers(work) == []


def test_a_rerun_writes_byte_identical_model_files(work, capsys):
    for out in ("a", "b"):
        assert run(["compress", "M", "-o", out, *TINY], capsys)[0] == 0
    a, b = snapshot(work / "a"), snapshot(work / "b")
    a.pop("qcompiler_report.json"), b.pop("qcompiler_report.json")  # it holds the timings
    assert a == b


# ---------------------------------------------------------------- found by a hostile review


def test_eval_never_writes_through_a_link_in_the_artifact(work, capsys):
    assert run(["compress", "M", "-o", "out", *TINY], capsys)[0] == 0
    (work / "victim.txt").write_text("precious")
    (work / "out" / "qcompiler_eval.json").symlink_to(work / "victim.txt")
    assert run(["eval", "out", "--text", WIKITEXT, "--no-original", "--window", "32", "--max-windows", "1"],
               capsys)[0] == 0
    assert (work / "victim.txt").read_text() == "precious"
    assert not (work / "out" / "qcompiler_eval.json").is_symlink()


@pytest.mark.parametrize("kind", ["folder", "pipe", "broken link"])
def test_a_safetensors_name_that_is_not_a_file_is_one_line(kind, work, capsys):
    path = work / "M" / "extra.safetensors"
    {"folder": path.mkdir, "pipe": lambda: os.mkfifo(path), "broken link": lambda: path.symlink_to(work / "nowhere")}[kind]()
    code, err = run(["compress", "M", "-o", "out", *TINY], capsys)
    assert code == 2 and "is not a regular file" in one_line(err)


def test_a_config_that_does_not_match_the_weights_is_refused_before_building_the_model(work, capsys):
    config = json.loads((work / "M" / "config.json").read_text())
    (work / "M" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1000000}))
    code, err = run(["compress", "M", "-o", "out", *TINY], capsys)
    assert code == 2 and "declares 1000000 layers but the weights hold 2" in one_line(err)


def test_an_artifact_is_not_taken_for_a_float_model(work, capsys):
    assert run(["compress", "M", "-o", "out", *TINY], capsys)[0] == 0
    code, err = run(["compress", "out", "-o", "again", *TINY], capsys)
    assert code == 2 and "is an artifact qcompiler wrote, not a float model" in one_line(err)
    code, err = run(["eval", "out", "--text", WIKITEXT, "--original", "out", "--window", "32", "--max-windows", "1"],
                    capsys)
    assert code == 2 and "is an artifact qcompiler wrote" in one_line(err)


def test_a_newline_in_a_path_cannot_forge_a_second_error_line(work, capsys):
    (work / "evil\nqcompiler: error: fake").mkdir()
    (work / "evil\nqcompiler: error: fake" / "x").write_text("x")
    code, err = run(["compress", "M", "-o", "evil\nqcompiler: error: fake", *TINY], capsys)
    assert code == 2 and one_line(err).count("qcompiler: error:") == 2  # the forged one is inside the line


def test_a_closed_standard_output_ends_quietly(work):
    proc = subprocess.Popen([QCOMPILER, "graph", "M"], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0 and b"Traceback" not in proc.stderr.read()


def test_a_companion_linking_outside_the_model_folder_is_not_copied(work, capsys):
    assert run(["compress", "M", "-o", "fp32", "--weight-format", "fp32", "--quiet"], capsys)[0] == 0
    (work / "secret.txt").write_text("not the model's")
    (work / "fp32" / "chat_template.jinja").symlink_to(work / "secret.txt")
    assert run(["compress", "fp32/openvino_model.xml", "-o", "int8", "--weight-format", "int8", "--quiet"],
               capsys)[0] == 0
    assert not (work / "int8" / "chat_template.jinja").exists()
