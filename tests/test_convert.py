"""The InternLM2 -> Llama converter against the official code's logits on the tiny fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from internlm_app.runtime.convert import (
    MARKER,
    PARTIAL_MARKER,
    ConversionError,
    convert_checkpoint,
    is_converted,
    llama_config,
    split_wqkv,
)
from internlm_app.runtime.model_source import resolve_model_dir
from tests.conftest import FIXTURE_DIR, tiny_settings


def _load(path, attn: str):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn).eval()


def _all_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_reference(converted_dir, reference, attn):
    model = _load(converted_dir, attn)
    assert type(model).__name__ == "LlamaForCausalLM"
    for case in reference["logits"]:
        with torch.no_grad():
            logits = model(torch.tensor([case["input_ids"]])).logits[0]
        diff = (logits[-1] - torch.tensor(case["last_logits"])).abs().max().item()
        assert diff < 1e-4, f"{case['name']}: max |diff| {diff}"
        assert logits.argmax(-1).tolist() == case["argmax"], case["name"]


def test_config_keeps_rope_and_shapes(converted_dir):
    cfg = json.loads((converted_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 1000000.0}
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 2, 8)
    assert cfg["rms_norm_eps"] == 1e-5
    gen = json.loads((converted_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 1104]


def test_rope_scaling_is_kept():
    src = json.loads((FIXTURE_DIR / "config.json").read_text())
    src["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    rope = llama_config(src)["rope_parameters"]
    assert rope == {"rope_type": "dynamic", "rope_theta": 1000000.0, "factor": 2.0}


def test_split_wqkv_groups_queries_per_kv_head():
    heads, kv, dim, hidden = 4, 2, 3, 5
    # Rows labelled by (kv group, slot, row): slots 0..1 are queries, 2 is key, 3 is value.
    rows = [[g * 100 + s * 10 + r] * hidden for g in range(kv) for s in range(heads // kv + 2) for r in range(dim)]
    q, k, v = split_wqkv(torch.tensor(rows, dtype=torch.float32), heads, kv, dim)
    assert q[:, 0].tolist() == [0, 1, 2, 10, 11, 12, 100, 101, 102, 110, 111, 112]
    assert k[:, 0].tolist() == [20, 21, 22, 120, 121, 122]
    assert v[:, 0].tolist() == [30, 31, 32, 130, 131, 132]


def test_bin_shards_with_index_convert_identically(tmp_path, converted_dir):
    src = tmp_path / "bin-ckpt"
    src.mkdir()
    for f in FIXTURE_DIR.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, src / f.name)
    state = load_file(str(FIXTURE_DIR / "model.safetensors"))
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for shard, shard_names in halves.items():
        torch.save({n: state[n].clone() for n in shard_names}, src / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = convert_checkpoint(src, tmp_path / "out")
    assert len(list(out.glob("*.safetensors"))) == 2
    expected, got = _all_tensors(converted_dir), _all_tensors(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_convert_rejects_non_internlm2(tmp_path, converted_dir):
    with pytest.raises(ConversionError):
        convert_checkpoint(converted_dir, tmp_path / "again")


def test_resolve_converts_once_then_reuses(tmp_path):
    settings = tiny_settings(tmp_path)
    calls = []
    first = resolve_model_dir(settings, progress=lambda step: calls.append((step.stage, step.done, step.total)))
    assert calls == [("convert", 0, 1), ("convert", 1, 1)]
    assert is_converted(first, FIXTURE_DIR)
    stamp = (first / "model-00001-of-00001.safetensors").stat().st_mtime_ns
    calls.clear()
    assert resolve_model_dir(settings, progress=lambda *a: calls.append(a)) == first
    assert calls == [] and (first / "model-00001-of-00001.safetensors").stat().st_mtime_ns == stamp


def test_interrupted_conversion_is_redone(tmp_path):
    """A process that died while converting left its half-written `.partial` folder (marked as ours): the next start
    converts again over it."""
    settings = tiny_settings(tmp_path)
    first = resolve_model_dir(settings)
    partial = first.with_name(first.name + ".partial")
    first.rename(partial)  # the finished files, as if the process had died just before its last step
    (partial / MARKER).unlink()
    (partial / PARTIAL_MARKER).touch()
    again = resolve_model_dir(settings)
    assert again == first and is_converted(again, FIXTURE_DIR) and not partial.exists()
    assert not (again / PARTIAL_MARKER).exists()


@pytest.mark.parametrize("where", ["output", "partial"])
def test_a_folder_holding_other_files_is_never_replaced(tmp_path, where):
    """`convert SRC DIR` (or INTERNLM_CONVERTED_DIR) naming a folder that holds anything but a conversion of this
    app (a data disk, the download, a user's notes): one clear error before any work, and every file kept."""
    src = _copy_of_fixture(tmp_path)
    dst = tmp_path / "models"
    folder = dst if where == "output" else dst.with_name("models.partial")
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(ConversionError, match=f"{folder} already exists and is not a conversion.*Choose a new"):
        convert_checkpoint(src, dst)
    assert (folder / "notes.txt").read_text() == "precious" and sorted(p.name for p in folder.iterdir()) == [
        "notes.txt"
    ]
    assert (src / "model.safetensors").is_file()
    settings = tiny_settings(tmp_path, converted_dir=dst)
    with pytest.raises(ConversionError, match="not a conversion by this app"):
        resolve_model_dir(settings)
    assert (folder / "notes.txt").read_text() == "precious"


def test_the_source_itself_is_never_the_output(tmp_path):
    src = _copy_of_fixture(tmp_path)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(ConversionError, match="not a conversion by this app"):
        convert_checkpoint(src, src)
    assert sorted(p.name for p in src.iterdir()) == before


def test_an_empty_folder_or_an_earlier_conversion_is_replaced(tmp_path):
    dst = tmp_path / "empty"
    dst.mkdir()
    assert is_converted(convert_checkpoint(FIXTURE_DIR, dst), FIXTURE_DIR)
    stamp = (dst / MARKER).stat().st_mtime_ns
    assert is_converted(convert_checkpoint(FIXTURE_DIR, dst), FIXTURE_DIR)  # ours: converted again in its place
    assert (dst / MARKER).stat().st_mtime_ns >= stamp and not (tmp_path / "empty.partial").exists()


def test_two_processes_starting_together_convert_once(tmp_path):
    """The web app and the API starting at once: both get the same finished conversion, made once."""
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from internlm_app.runtime.model_source import resolve_model_dir;"
        "from tests.conftest import tiny_settings; print(resolve_model_dir(tiny_settings(Path(sys.argv[1]))))"
    )
    root = FIXTURE_DIR.parents[2]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=root, env=env, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = {p.communicate(timeout=120)[0].decode().strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    (converted,) = outputs
    assert is_converted(Path(converted), FIXTURE_DIR)
    assert _all_tensors(Path(converted)).keys() == _all_tensors(resolve_model_dir(tiny_settings(tmp_path))).keys()


def _copy_of_fixture(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(FIXTURE_DIR, src)
    return src


def test_a_truncated_weights_file_is_one_clear_error_and_leaves_nothing_behind(tmp_path):
    src = _copy_of_fixture(tmp_path)
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match="model.safetensors is incomplete or corrupt.*download the model again"):
        convert_checkpoint(src, dst)
    assert not dst.exists() and not (tmp_path / "out.partial").exists()


def test_an_index_naming_an_absent_shard_is_one_clear_error(tmp_path):
    src = _copy_of_fixture(tmp_path)
    shard = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model.safetensors", "output.weight": shard}})
    )
    with pytest.raises(ConversionError, match=f"not in {src}: {shard}"):
        convert_checkpoint(src, tmp_path / "out")


def test_an_output_path_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ConversionError, match="exists and is not a directory"):
        convert_checkpoint(FIXTURE_DIR, tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "a file" and not (tmp_path / "taken.partial").exists()


def test_a_conversion_place_that_cannot_be_written_is_one_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    settings = tiny_settings(tmp_path, converted_dir=tmp_path / "a-file" / "sub" / "out")
    with pytest.raises(ConversionError, match="INTERNLM_CONVERTED_DIR"):
        resolve_model_dir(settings)


def test_a_file_where_the_partial_folder_goes_is_kept_unless_empty(tmp_path):
    (tmp_path / "out.partial").write_text("notes")  # a user's file: never deleted (third reviewer)
    with pytest.raises(ConversionError, match="out.partial already exists and is not a conversion"):
        convert_checkpoint(FIXTURE_DIR, tmp_path / "out")
    assert (tmp_path / "out.partial").read_text() == "notes"
    (tmp_path / "out.partial").write_text("")  # an empty one: nothing to lose
    assert is_converted(convert_checkpoint(FIXTURE_DIR, tmp_path / "out"))


def test_a_partial_killed_just_before_its_rename_is_ours(tmp_path):
    """Killed after the finished marker was written into `.partial` but before the rename: the next conversion
    knows that folder as its own and replaces it."""
    dst = tmp_path / "out"
    convert_checkpoint(FIXTURE_DIR, dst).rename(tmp_path / "out.partial")
    assert is_converted(convert_checkpoint(FIXTURE_DIR, dst), FIXTURE_DIR) and not (tmp_path / "out.partial").exists()


def test_files_put_in_the_output_while_it_converts_are_kept(tmp_path):
    """Someone writes into the (empty) output folder while the shards convert: the final replace checks again and
    stops rather than delete it (third reviewer)."""
    dst = tmp_path / "out"
    dst.mkdir()

    def user_writes(step):
        if step.done == 0:
            (dst / "user.txt").write_text("mine")

    with pytest.raises(ConversionError, match="not a conversion by this app"):
        convert_checkpoint(FIXTURE_DIR, dst, progress=user_writes)
    assert (dst / "user.txt").read_text() == "mine" and not (tmp_path / "out.partial").exists()


def test_dot_home_and_symlinked_outputs_are_their_real_places(tmp_path, monkeypatch):
    """`convert SRC .` names the current folder (refused: it holds files); a symlinked output is converted where it
    points (third reviewer: '. has an empty name', and a whole conversion that then failed on the rename)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises(ConversionError, match="not a conversion by this app"):
        convert_checkpoint(FIXTURE_DIR, Path("."))
    assert (work / "notes.txt").read_text() == "mine"
    target = tmp_path / "disk" / "converted"
    target.mkdir(parents=True)
    (tmp_path / "link").symlink_to(target)
    assert is_converted(convert_checkpoint(FIXTURE_DIR, tmp_path / "link"), FIXTURE_DIR)
    assert (tmp_path / "link").is_symlink() and is_converted(target, FIXTURE_DIR)


def test_a_converted_dir_under_home_is_converted_once(tmp_path, monkeypatch):
    """INTERNLM_CONVERTED_DIR=~/conv: checked, locked and written at its real place, so the next start reuses it
    (fourth reviewer: a literal './~/conv.lock', and every start converted again)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    settings = tiny_settings(tmp_path, converted_dir="~/conv")
    first = resolve_model_dir(settings)
    assert first == tmp_path / "home" / "conv" and is_converted(first, FIXTURE_DIR)
    stamp = (first / MARKER).stat().st_mtime_ns
    assert resolve_model_dir(settings) == first and (first / MARKER).stat().st_mtime_ns == stamp
    assert not (tmp_path / "~").exists()


def test_the_root_is_no_place_for_a_conversion(tmp_path):
    with pytest.raises(ConversionError, match="no place for a conversion"):
        convert_checkpoint(FIXTURE_DIR, Path("/"))


def test_two_conversions_into_one_folder_at_once_convert_it_once(tmp_path, monkeypatch):
    """Two `convert` runs (or serve's web app and API) into one folder: the second waits for the first and reuses its
    result; neither writes into the other's `.partial` (which once left a folder marked done without its shards)."""
    import threading
    import time

    from internlm_app.runtime import convert

    real, calls = convert._convert_into, []

    def slow(*args, **kwargs):
        calls.append(threading.current_thread().name)
        time.sleep(0.5)  # still writing when the second run starts
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "_convert_into", slow)
    dst, results = tmp_path / "out", []
    runs = [threading.Thread(target=lambda: results.append(convert.convert_checkpoint(FIXTURE_DIR, dst))) for _ in "ab"]
    for run in runs:
        run.start()
        time.sleep(0.1)
    for run in runs:
        run.join(30)
    assert results == [dst, dst] and len(calls) == 1 and convert.is_converted(dst, FIXTURE_DIR)
