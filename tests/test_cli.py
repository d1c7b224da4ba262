"""Bad input through the CLI: one clear line on stderr, a non-zero exit, no traceback."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit.cli import main
from tests.conftest import tiny_config, write_hf_checkpoint
from tests.quant.tiny import one_thread  # noqa: F401 (fixture)


def run_error(capsys, argv, match):
    capsys.readouterr()  # drop what fixtures printed
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("lowbit: error:"), err
    assert match in err[0], err[0]
    return err[0]


@pytest.fixture
def folder(tmp_path):
    write_hf_checkpoint(tmp_path / "m", tiny_config())
    return tmp_path / "m"


def test_truncated_safetensors(capsys, folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    run_error(capsys, ["info", str(folder)], "truncated")


def test_garbage_safetensors(capsys, folder):
    (folder / "model.safetensors").write_bytes(b"not a safetensors file at all")
    run_error(capsys, ["info", str(folder)], "model.safetensors")


def test_missing_config(capsys, folder):
    (folder / "config.json").unlink()
    run_error(capsys, ["info", str(folder)], "missing config.json")


def test_missing_folder(capsys, tmp_path):
    run_error(capsys, ["info", str(tmp_path / "nope")], "no such file or folder")


def test_bits_5(capsys, folder):
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 5, "group_size": 128}))
    run_error(capsys, ["info", str(folder)], "bits=5")


def test_pickle_needs_opt_in(capsys, folder):
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    run_error(capsys, ["info", str(folder)], "--allow-pickle")
    assert main(["info", str(folder), "--allow-pickle"]) == 0
    assert "parameters" in capsys.readouterr().out


def test_shape_mismatch(capsys, folder):
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    sd["model.norm.weight"] = torch.ones(7)
    save_file(sd, str(folder / "model.safetensors"))
    run_error(capsys, ["generate", str(folder), "hi", "--no-template"], "norm.weight")


def test_unknown_template(capsys, folder):
    run_error(capsys, ["generate", str(folder), "hi", "--template", "nonsense"], "nonsense")


def test_bad_sampling_value(capsys, folder):
    run_error(capsys, ["generate", str(folder), "hi", "--top-p", "1.5"], "top_p")


def test_bad_decode_steps(capsys, folder):
    run_error(capsys, ["generate", str(folder), "hi", "--decode-steps", "0"], "--decode-steps")
    run_error(capsys, ["chat", str(folder), "--decode-steps", "-1"], "--decode-steps")


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--no-such-flag"])
    assert e.value.code == 2


def test_bad_prefill_chunk_exits_2_before_loading(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "/no/such/model", "hi", "--prefill-chunk", "-1"])
    assert e.value.code == 2 and "--prefill-chunk" in capsys.readouterr().err


def test_overlap_bursts_is_on_unless_turned_off():
    import argparse

    from lowbit.cli.common import add_engine_args, engine_options
    from lowbit.engine.engine import EngineConfig

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert EngineConfig(**engine_options(parser.parse_args([]))).overlap_bursts
    assert not EngineConfig(**engine_options(parser.parse_args(["--no-overlap-bursts"]))).overlap_bursts


def test_generate_with_prefill_chunks_and_host_embeddings_prints_the_same(capsys, tmp_path):
    """On a CPU --embeddings-on-host is a no-op; chunks of 2 tokens give the one-shot prefill's greedy text."""
    from tests.chat_model import write_tiny_chat_model

    model = str(write_tiny_chat_model(tmp_path / "chat"))
    argv = ["generate", model, "a prompt of several tokens", "--temperature", "0", "--max-new-tokens", "12",
            "--device", "cpu", "--no-template"]
    outs = []
    for extra in (["--prefill-chunk", "0"], ["--prefill-chunk", "2", "--embeddings-on-host"]):
        capsys.readouterr()
        assert main(argv + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0]) > 1


def test_info_float(capsys, folder):
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "none (float)" in out


@pytest.mark.slow
def test_generate_prints_what_transformers_greedy_prints(capsys, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "Gravity is the force that"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1]:]
    expected = tok.decode(out, skip_special_tokens=True)
    capsys.readouterr()
    assert main(["generate", str(smollm2_dir), prompt, "--temperature", "0", "--no-template",
                 "--max-new-tokens", "64", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.slow
def test_chat_repl_multi_turn(capsys, monkeypatch, smollm2_dir):
    import io

    lines = "What is the capital of France?\n/system You answer in one word.\n/reset\nHello!\n/bogus\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    capsys.readouterr()
    assert main(["chat", str(smollm2_dir), "--temperature", "0", "--max-new-tokens", "24", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "conversation cleared" in err and "unknown command /bogus" in err


@pytest.mark.slow
def test_demo_walks_the_whole_path(capsys, tmp_path, smollm2_dir):
    """The README's main command, shrunk: quantize with 2 windows, 2 perplexity windows, a short reply."""
    from lowbit import demo

    lines = []
    settings = demo.DemoSettings(model=str(smollm2_dir), nsamples=2, eval_windows=2, max_new_tokens=8)
    demo.run(settings, tmp_path, "cpu", say=lines.append)
    text = "\n".join(lines)
    assert "[4/4]" in text and "assistant:" in text
    float_ppl, quant_ppl = (float(line.split()[-3]) for line in lines if line.strip().startswith(("float", "GPTQ")))
    assert 1 < float_ppl < quant_ppl < 3 * float_ppl
    assert (tmp_path / "demo" / f"{smollm2_dir.name}-gptq-4bit-128g" / "quantize_config.json").exists()


# ----------------------------------------------------------------------------- quantize, apply-delta

PROSE = "The quick brown fox jumps over the lazy dog. A rose is a rose, isn't it?\n" * 40


@pytest.fixture
def quant_setup(tmp_path):
    from tests.quant.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "m")
    (tmp_path / "prose.txt").write_text(PROSE)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((model / "config.json").read_text())
    (tmp_path / "exists").mkdir()
    return tmp_path


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("extra,match", [
    (["--variants", "4bit-128g,4bit-128g-fast"], "unknown variant '4bit-128g-fast'"),
    (["--variants", "4bit-128g,5bit-128g"], "bits=5"),
    (["--bits", "5"], "bits=5"),
    (["--dataset", "{tmp}/empty.txt"], "no text found"),
    (["--model", "{tmp}/no-weights"], "no weights found"),
    (["--out", "{tmp}/exists"], "already exists; pass --overwrite"),
    (["--out", "{tmp}/exists", "--variants", "4bit-32g"], "already exists; pass --overwrite"),
    (["--variants", "4bit-32g", "--bits", "3"], "drop --bits"),
    (["--lora", "{tmp}/nowhere"], "no such adapter folder"),
    (["--method", "awq"], "unknown method"),
    (["--desc-act", "--act-group-aware"], "act_group_aware (GAR) needs desc_act off"),
])
def test_quantize_bad_input(capsys, quant_setup, extra, match):
    tmp = quant_setup
    extra = [e.format(tmp=tmp) for e in extra]
    model, out = str(tmp / "m"), str(tmp / "out")
    if "--model" in extra:
        model = extra.pop(extra.index("--model") + 1)
        extra.remove("--model")
    if "--out" in extra:
        out = extra.pop(extra.index("--out") + 1)
        extra.remove("--out")
    before = snapshot(tmp)
    run_error(capsys, ["quantize", model, out, "--dataset", str(tmp / "prose.txt"), "--nsamples", "2",
                       "--seqlen", "16", "--device", "cpu", *extra], match)
    assert snapshot(tmp) == before


@pytest.mark.usefixtures("one_thread")
def test_quantize_variants_then_eval(capsys, quant_setup):
    tmp = quant_setup
    capsys.readouterr()
    assert main(["quantize", str(tmp / "m"), str(tmp / "out"), "--variants", "4bit-32g,8bit--1g-actorder",
                 "--dataset", str(tmp / "prose.txt"), "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "gptq-4bit-32g-actorder_False: wrote" in out and "gptq-8bit--1g-actorder_True: wrote" in out
    card = (tmp / "out" / "README.md").read_text()
    assert "| gptq-8bit--1g-actorder_True | 8 | None | Yes | 0.01 |" in card and str(tmp / "prose.txt") in card
    assert main(["eval", "ppl", str(tmp / "out" / "gptq-8bit--1g-actorder_True"), "--dataset",
                 str(tmp / "prose.txt"), "--seqlen", "32", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] > 0 and result["perplexity"] > 1


@pytest.mark.usefixtures("one_thread")
def test_apply_delta_cli(capsys, quant_setup):
    from tests.quant.tiny import write_tiny_model

    tmp = quant_setup
    other = write_tiny_model(tmp / "wider", hidden_size=32, tokenizer=False)
    before = snapshot(tmp)
    run_error(capsys, ["apply-delta", str(tmp / "m"), str(other), str(tmp / "out")], "the base has shape")
    assert snapshot(tmp) == before
    assert main(["apply-delta", str(tmp / "m"), str(tmp / "m"), str(tmp / "doubled")]) == 0
    assert "wrote" in capsys.readouterr().out
    from safetensors.torch import load_file

    a, b = load_file(tmp / "m" / "model.safetensors"), load_file(tmp / "doubled" / "model.safetensors")
    assert all(torch.equal(b[k], 2 * a[k]) for k in a)


@pytest.mark.usefixtures("one_thread")
def test_quantize_full_disk_then_resume(capsys, quant_setup, monkeypatch):
    import errno

    from lowbit.model import checkpoint

    tmp = quant_setup
    argv = ["quantize", str(tmp / "m"), str(tmp / "out"), "--dataset", str(tmp / "prose.txt"), "--nsamples", "2",
            "--seqlen", "16", "--device", "cpu", "--group-size", "32"]
    model_files = {p.name: p.read_bytes() for p in (tmp / "m").iterdir()}
    real_save = checkpoint._save

    def full_disk(folder, i, tensors, save_file):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / f"shard-{i}.partial"))

    monkeypatch.setattr(checkpoint, "_save", full_disk)
    run_error(capsys, argv, "No space left on device")
    assert {p.name: p.read_bytes() for p in (tmp / "m").iterdir()} == model_files
    assert not (tmp / "out").exists() and not list(tmp.glob(".out.tmp-*"))  # no half-written folder
    assert json.loads((tmp / ".out.partial" / "progress.json").read_text())["layers_done"] == 2
    monkeypatch.setattr(checkpoint, "_save", real_save)
    assert main(argv + ["--resume"]) == 0
    assert (tmp / "out" / "model.safetensors").exists() and not (tmp / ".out.partial").exists()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("extra,expected", [
    ([], {"desc_act": True, "static_groups": True, "sym": False, "meta": {"act_group_aware": False}}),  # recommended
    (["--no-desc-act", "--sym", "--no-mse"],  # GAR comes on without act-order, as in GPTQModel
     {"desc_act": False, "static_groups": False, "sym": True, "meta": {"act_group_aware": True}}),
    (["--act-group-aware"], {"desc_act": False, "static_groups": False, "sym": False, "meta": {"act_group_aware": True}}),
    (["--no-desc-act", "--no-act-group-aware"], {"desc_act": False, "meta": {"act_group_aware": False}}),
    (["--method", "rtn"], {"desc_act": False, "static_groups": False, "sym": True}),  # the plain baseline
])
def test_quantize_defaults_are_the_recommended_recipe(capsys, quant_setup, extra, expected):
    tmp = quant_setup
    assert main(["quantize", str(tmp / "m"), str(tmp / "out"), "--dataset", str(tmp / "prose.txt"),
                 "--nsamples", "2", "--seqlen", "16", "--device", "cpu", *extra]) == 0
    written = json.loads((tmp / "out" / "quantize_config.json").read_text())
    assert {k: written[k] for k in expected} == expected
    assert written["checkpoint_format"] == "gptq" and written["bits"] == 4 and written["group_size"] == 128
