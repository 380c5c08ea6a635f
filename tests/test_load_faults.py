"""Load and convert faults: quantized or misshapen weights, a missing shard, damaged JSON, a full disk while
converting, a bad dtype setting. Each is one readable line and a non-zero exit, and nothing half-written is left
where a later start would take it for a good conversion."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from internlm_app import cli
from internlm_app.runtime import convert
from internlm_app.runtime.convert import MARKER, ConversionError, convert_checkpoint, is_converted
from internlm_app.runtime.loader import ModelLoadError, load_model
from internlm_app.runtime.model_source import resolve_model_dir
from tests.conftest import FIXTURE_DIR, tiny_settings


def _copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(FIXTURE_DIR, src)
    return src


def _rewrite_weights(src: Path, change) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _nothing_left(dst: Path) -> bool:
    return not dst.exists() and not dst.with_name(dst.name + ".partial").exists()


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return line


def _quantized(tensors: dict) -> None:
    name = next(n for n in tensors if n.endswith("attention.wo.weight"))
    tensors[name] = (tensors[name] * 100).to(torch.int8)


def _misshapen(tensors: dict) -> None:
    name = next(n for n in tensors if "wqkv" in n)
    tensors[name] = tensors[name][:-3]


@pytest.mark.parametrize(
    "change,expected",
    [
        (_quantized, r"holds model\.layers\.0\.attention\.wo\.weight as int8, not as floating-point weights"),
        (_misshapen, r"model\.layers\.0\.attention\.wqkv\.weight has shape \(93, 64\).*needs 96 rows"),
    ],
    ids=["integer-weights", "wqkv-shape"],
)
def test_weights_of_the_wrong_dtype_or_shape_are_one_clear_error(tmp_path, capsys, change, expected):
    src = _copy(tmp_path)
    _rewrite_weights(src, change)
    with pytest.raises(ConversionError, match=expected):
        convert_checkpoint(src, tmp_path / "out")
    assert _nothing_left(tmp_path / "out")
    code, err = _cli(capsys, "chat", "--model-path", str(src), "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and "error: " in _one_error_line(err)


def test_a_missing_shard_of_a_checkpoint_without_index_is_refused(tmp_path):
    src = _copy(tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    (src / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in first}, str(src / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in second}, str(src / "model-00002-of-00002.safetensors"))
    assert is_converted(convert_checkpoint(src, tmp_path / "whole"))  # both shards: a good conversion
    (src / "model-00002-of-00002.safetensors").unlink()  # the download stopped half-way
    with pytest.raises(ConversionError, match=r"lacks \d+ weights that its config.json needs.*download the model"):
        convert_checkpoint(src, tmp_path / "out")
    assert _nothing_left(tmp_path / "out")


def test_a_native_checkpoint_missing_a_weight_is_refused_not_filled_with_random_values(tmp_path, converted_dir):
    broken = tmp_path / "broken"
    shutil.copytree(converted_dir, broken)
    (shard,) = broken.glob("*.safetensors")
    tensors = load_file(str(shard))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"lacks 1 weights \(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        load_model(tiny_settings(tmp_path, model_path=broken))


@pytest.mark.parametrize("damaged", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_a_damaged_json_file_is_named_in_one_line(tmp_path, capsys, damaged):
    src = _copy(tmp_path)
    (src / damaged).write_text('{"model_type": "intern')  # cut short
    code, err = _cli(capsys, "convert", str(src), str(tmp_path / "out"))
    line = _one_error_line(err)
    assert code == 2 and f"{src / damaged} is not a readable JSON file" in line and "download the model" in line
    assert _nothing_left(tmp_path / "out")


def test_a_damaged_conversion_marker_means_convert_again(tmp_path):
    settings = tiny_settings(tmp_path)
    first = resolve_model_dir(settings)
    (first / MARKER).write_text('{"version": 1, "sour')  # cut short by a crash
    assert not is_converted(first)
    assert resolve_model_dir(settings) == first and is_converted(first, FIXTURE_DIR)


def _enospc_after_half(real):
    def save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # what a full disk leaves: the first half of the file
            f.truncate(Path(filename).stat().st_size // 2)
        # safetensors' own words for it (measured on a full tmpfs; see tests/test_store_real_disk.py)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save


def test_a_full_disk_while_converting_is_one_line_and_leaves_nothing_a_later_start_would_use(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(convert, "save_file", _enospc_after_half(convert.save_file))
    dst = tmp_path / "out"
    code, err = _cli(capsys, "convert", str(FIXTURE_DIR), str(dst))
    line = _one_error_line(err)
    assert code == 2 and "No space left on device" in line and "free space" in line
    assert _nothing_left(dst)
    settings = tiny_settings(tmp_path)  # the chat's own conversion into the cache: the same, through the CLI
    code, err = _cli(capsys, "chat", "--model-path", str(FIXTURE_DIR), "--cache-dir", str(settings.cache_dir))
    assert code == 2 and "No space left on device" in _one_error_line(err)
    converted = list((settings.cache_dir / "converted").glob("*"))
    assert all(not is_converted(p) and not p.name.endswith(".partial") for p in converted), converted
    monkeypatch.undo()  # space freed: the next start converts from scratch and loads
    _, _, info = load_model(settings)
    assert info.context_window == 512


def test_a_full_disk_while_writing_the_marker_leaves_no_conversion(tmp_path, monkeypatch):
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == MARKER:
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(ConversionError, match="No space left on device"):
        convert_checkpoint(FIXTURE_DIR, tmp_path / "out")
    assert _nothing_left(tmp_path / "out")


@pytest.mark.parametrize(
    "argv,env,expected",
    [
        (["--dtype", "int8"], {}, "INTERNLM_DTYPE / --dtype: Input should be 'auto', 'float16', 'bfloat16' or"),
        ([], {"INTERNLM_DTYPE": "fp16"}, "(given: 'fp16')"),
        (["--max-length", "-5"], {}, "INTERNLM_MAX_LENGTH / --max-length"),
    ],
    ids=["dtype-flag", "dtype-env", "max-length"],
)
def test_a_bad_setting_is_one_line_naming_the_flag_and_the_variable(tmp_path, capsys, monkeypatch, argv, env, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, err = _cli(capsys, "chat", "--model-path", str(FIXTURE_DIR), *argv)
    assert code == 2 and expected in _one_error_line(err)


def test_an_offline_download_fails_once_with_what_to_do(tmp_path, monkeypatch):
    """No network: the file listing fails with a connection error, and the download says so at once instead of
    retrying the same for as long again in snapshot_download (reviewer: 33 s offline, now the listing's retries)."""
    import modelscope
    from modelscope.hub.api import HubApi

    from internlm_app.runtime.model_source import ModelSourceError, download_model

    downloads = []

    def offline(*args, **kwargs):
        raise ConnectionError("[E1020] Connection failed: Name or service not known")

    monkeypatch.setattr(HubApi, "get_model_files", offline)
    monkeypatch.setattr(modelscope, "snapshot_download", lambda *a, **k: downloads.append(a))
    steps = []
    with pytest.raises(ModelSourceError, match="Check the network.*INTERNLM_MODEL_PATH") as raised:
        download_model("Shanghai_AI_Laboratory/internlm2-chat-7b", "master", tmp_path, steps.append)
    assert raised.value.reason == "download_failed" and downloads == [] and steps == []


def _set_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads is 0, not a positive whole number"),
        ({"vocab_size": 1106.5}, "vocab_size is 1106.5"),
        ({"rope_theta": "x"}, "rope_theta is 'x', not a positive number"),
        ({"num_key_value_heads": 3}, "num_key_value_heads is 3"),
        ({"rope_scaling": "linear"}, "rope_scaling is 'linear', not an object"),
        ({"rope_scaling": {"type": "weird", "factor": 2}}, "rope_scaling's type is 'weird'"),
        ({"rope_scaling": {"factor": 2}}, "rope_scaling's type is None"),
        ({"rope_scaling": {"type": "linear"}}, "factor"),
        ({"rope_scaling": {"type": "dynamic", "factor": "2"}}, "factor is '2'"),
        ({"rope_scaling": {"type": "linear", "factor": 0}}, "factor is 0"),
        ({"rope_theta": float("nan")}, "rope_theta is nan"),
        ({"eos_token_id": "x"}, "eos_token_id is 'x'"),
        ({"pad_token_id": 10**9}, "pad_token_id is 1000000000"),
        ({"hidden_act": "gelu_fancy"}, "transformers cannot build a model"),
    ],
)
def test_a_config_no_model_can_be_built_from_is_named_before_anything_is_converted(tmp_path, changes, expected):
    """Each was a traceback (ZeroDivisionError, KeyError, AttributeError ...), some after the conversion was written
    and marked done, so that fixing the file changed nothing."""
    src = _copy(tmp_path)
    _set_config(src, **changes)
    with pytest.raises(ConversionError, match=re.escape(expected)):
        convert_checkpoint(src, tmp_path / "out")
    assert _nothing_left(tmp_path / "out")


@pytest.mark.parametrize("damage", ["missing", "truncated", "no-config", "decoder-list", "bad-generation"])
def test_an_internlm2_checkpoint_without_a_readable_tokenizer_is_refused_first(tmp_path, damage):
    """It converted, then the tokenizer fell back to AutoTokenizer, which asked for trust_remote_code; without its
    tokenizer_config.json it converted and then called the copy damaged (converting again made the same copy); a
    damaged generation_config.json was said only after every shard was converted."""
    src = _copy(tmp_path)
    if damage == "missing":
        (src / "tokenizer.model").unlink()
    elif damage == "truncated":
        (src / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes()[:1000])
    elif damage == "no-config":
        (src / "tokenizer_config.json").unlink()
    elif damage == "decoder-list":
        config = json.loads((src / "tokenizer_config.json").read_text())
        (src / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": []}))
    else:
        (src / "generation_config.json").write_text('{"eos_token_id": ')
    with pytest.raises(ConversionError, match="tokenizer|generation_config"):
        convert_checkpoint(src, tmp_path / "out")
    assert _nothing_left(tmp_path / "out")


def test_a_conversion_is_made_again_when_its_source_changed(tmp_path):
    """The conversion was reused as long as the source folder's path was the same: new weights (a new download), or
    a config.json fixed after a failure, changed nothing."""
    src = _copy(tmp_path)
    settings = tiny_settings(tmp_path, model_path=src)
    first = resolve_model_dir(settings)
    assert is_converted(first, src)
    _rewrite_weights(src, lambda tensors: tensors["model.norm.weight"].fill_(7.0))
    assert not is_converted(first, src)  # the source's weights changed since
    model, _, _ = load_model(settings)
    assert torch.all(model.model.norm.weight == 7.0)
    assert is_converted(first, src)


def test_weights_beyond_or_unlike_what_the_config_describes_are_refused(tmp_path, converted_dir):
    """A config with fewer layers than the weights loaded and replied (the extra layer dropped in silence); one with
    another MLP size was a RuntimeError traceback, or converted and then sent the user round in circles ("the
    converted copy is damaged: delete it" made the same copy). The conversion compares every weight with the model
    transformers builds from the config; a native folder is checked when it loads."""
    for changes, expected in (
        ({"num_hidden_layers": 1}, "does not describe"),
        ({"intermediate_size": 128}, "but .*config.json gives"),
        ({"vocab_size": 2000}, "but .*config.json gives"),
    ):
        src = tmp_path / f"src-{next(iter(changes.values()))}"
        shutil.copytree(FIXTURE_DIR, src)
        _set_config(src, **changes)
        with pytest.raises(ConversionError, match=expected):
            convert_checkpoint(src, tmp_path / "out")
        assert _nothing_left(tmp_path / "out")
    native = tmp_path / "native"
    shutil.copytree(converted_dir, native)
    _set_config(native, num_hidden_layers=1)
    with pytest.raises(ModelLoadError, match="beyond what its config.json describes"):
        load_model(tiny_settings(tmp_path, model_path=native))
    _set_config(native, num_hidden_layers=2, intermediate_size=128)
    with pytest.raises(ModelLoadError, match="shapes its config.json gives|wrongly shaped"):
        load_model(tiny_settings(tmp_path, model_path=native))


def test_a_source_edited_while_it_converts_is_not_recorded_as_converted(tmp_path, monkeypatch):
    """The marker listed the source's files as they were at the end: a config edited mid-conversion was recorded as
    converted, and the stale copy used from then on."""
    src = _copy(tmp_path)
    real = convert._save_shard

    def edit_meanwhile(tensors, path):
        real(tensors, path)
        _set_config(src, rope_theta=5000000)

    monkeypatch.setattr(convert, "_save_shard", edit_meanwhile)
    with pytest.raises(ConversionError, match="changed while it was being converted"):
        convert_checkpoint(src, tmp_path / "out")
    assert _nothing_left(tmp_path / "out")


def test_a_model_folder_that_needs_its_own_code_is_refused_without_running_it(tmp_path):
    """transformers asked "Do you wish to run the custom code? [y/N]" and, answered y, ran the folder's files."""
    folder = tmp_path / "own_code"
    folder.mkdir()
    ran = tmp_path / "ran"
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "evilmodel", "auto_map": auto_map}))
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="never runs") as refused:
        load_model(tiny_settings(tmp_path, model_path=folder))
    assert refused.value.reason == "not_a_model" and not ran.exists()


def test_a_native_folder_without_a_tokenizer_is_named(tmp_path, converted_dir):
    """It failed at the warm-up with "Expected tensor ... Long, Int; got FloatTensor"."""
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(converted_dir, folder)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        load_model(tiny_settings(tmp_path, model_path=folder))


def test_the_converted_shards_are_as_readable_as_its_other_files(tmp_path):
    out = convert_checkpoint(_copy(tmp_path), tmp_path / "out")
    mode = (out / "config.json").stat().st_mode & 0o777
    assert {shard.stat().st_mode & 0o777 for shard in out.glob("*.safetensors")} == {mode}


def test_a_conversion_waiting_for_another_says_so(tmp_path, caplog):
    """It printed only "converting ... (once)" and waited in silence while another process held the folder."""
    import fcntl
    import logging
    import os
    import threading

    src, out = _copy(tmp_path), tmp_path / "conv" / "out"
    out.parent.mkdir()
    holder = os.open(out.parent, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process converting into that folder
    caplog.set_level(logging.INFO, logger="internlm_app.runtime.convert")
    converting = threading.Thread(target=convert_checkpoint, args=(src, out))
    converting.start()
    try:
        assert wait_for(lambda: "waiting for another conversion" in caplog.text)
    finally:
        os.close(holder)  # (releases the lock)
    converting.join(60)
    assert is_converted(out, src)


def wait_for(condition, timeout: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_download_onto_a_disk_too_small_for_the_model_and_its_conversion_is_warned_about(tmp_path, caplog):
    """On AutoDL the default cache is on the 30 GB system disk: the download started without a word."""
    import logging
    import shutil as shutil_module
    from collections import namedtuple

    from internlm_app.runtime import model_source

    usage = namedtuple("usage", "total used free")
    caplog.set_level(logging.WARNING, logger="internlm_app.runtime.model_source")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shutil_module, "disk_usage", lambda path: usage(30e9, 20e9, 10e9))
        mp.setattr(model_source, "download_model", lambda *args, **kwargs: tmp_path)
        model_source.source_dir(tiny_settings(tmp_path, model_path=None))
    assert "only 10.0 GB free" in caplog.text and "INTERNLM_CACHE_DIR" in caplog.text


def test_a_conversion_made_before_the_marker_listed_the_source_is_kept_and_upgraded(tmp_path):
    """The new marker (with the source's files) made every earlier conversion convert again: minutes, and twice its
    disk space for a while on a 30 GB disk. One of the same folder is kept and its marker upgraded; one whose source's
    weights were deleted since (to save disk) is used as it is."""
    src = _copy(tmp_path)
    out = convert_checkpoint(src, tmp_path / "out")
    meta = json.loads((out / MARKER).read_text())
    old = {key: value for key, value in meta.items() if key != "source_files"} | {"version": 1}
    (out / MARKER).write_text(json.dumps(old))
    assert is_converted(out, src)
    upgraded = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps(old))
    os.utime(out / MARKER, ns=(1, 1))  # a source file newer than the version-1 marker: changed since, converted again
    assert not is_converted(out, src)
    (out / MARKER).write_text(json.dumps(upgraded))
    assert upgraded["version"] == convert.CONVERSION_VERSION and upgraded["source_files"] == meta["source_files"]
    _rewrite_weights(src, lambda tensors: tensors["model.norm.weight"].fill_(3.0))
    assert not is_converted(out, src)  # from now on a change of the source is noticed
    (out / MARKER).write_text(json.dumps(meta))
    (src / "model.safetensors").unlink()
    assert is_converted(out, src)  # the source's weights are gone: the copy is what there is
