"""LoRA through PEFT: only adapters learn, the run's model/ is the merged plain model, the export
loads with plain transformers and matches the PEFT model, and QLoRA refuses a CPU in one line."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpolab.cli import main
from dpolab.config import TrainConfig
from dpolab.data import prepare_data
from dpolab.dpo.trainer import train
from dpolab.errors import ConfigError
from dpolab.lora import adapter_base, add_adapters, load_adapter_model, target_modules
from dpolab.model import build_builtin, load_tokenizer
from dpolab.scoring.collate import PreferenceCollator
from dpolab.scoring.logps import concatenated_forward
from tests.conftest import tiny_config


def test_only_adapter_parameters_receive_gradients(tmp_path):
    config = TrainConfig(lora_r=4, cache_dir=str(tmp_path), max_train_pairs=4, max_eval_pairs=1)
    model = add_adapters(build_builtin("tiny-gpt2"), config)
    pairs = prepare_data(config, load_tokenizer("tiny-gpt2"))[0]["train"]
    batch = PreferenceCollator(50256)([pairs[i] for i in range(len(pairs))])
    model.train()
    chosen, rejected = concatenated_forward(model, batch)  # (B,), (B,)
    (rejected - chosen).mean().backward()

    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert all("lora_" in n for n in trainable), sorted(trainable - {n for n in trainable if "lora_" in n})
    # GPT-2 defaults: every attention and MLP projection of both blocks has an adapter (A and B).
    adapted = {n.split(".lora_")[0].split("transformer.")[-1] for n in trainable}
    assert adapted == {f"h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.02 * frozen


def test_target_module_defaults_per_architecture():
    config = TrainConfig(lora_r=8)
    assert target_modules(config, "gpt2") == ["c_attn", "c_proj", "c_fc"]
    assert "down_proj" in target_modules(config, "llama")
    assert target_modules(config, "some-new-arch") == "all-linear"
    assert target_modules(TrainConfig(lora_r=8, lora_target_modules=["c_attn"]), "gpt2") == ["c_attn"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return train(tiny_config(lora_r=8, lora_alpha=16, max_steps=4, learning_rate=5e-3, max_train_pairs=16,
                             max_eval_pairs=8), tmp_path_factory.mktemp("lora") / "run")


def test_lora_run_saves_merged_model_and_adapter(lora_run):
    assert lora_run.has_adapter() and adapter_base(lora_run.adapter_dir) == "tiny-gpt2"
    assert lora_run.summary()["train"]["steps"] == 4
    merged = AutoModelForCausalLM.from_pretrained(lora_run.model_dir)
    base = build_builtin("tiny-gpt2")
    # The adapters moved the adapted projections; untouched weights (embeddings) are the base's.
    assert torch.equal(merged.transformer.wte.weight, base.transformer.wte.weight)
    assert not torch.allclose(merged.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)


def test_merged_export_loads_plain_and_matches_the_peft_model(lora_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(lora_run.path), "export"]) == 0
    plain = AutoModelForCausalLM.from_pretrained("export").eval()
    peft_model = load_adapter_model(lora_run.adapter_dir, build_builtin("tiny-gpt2")).eval()
    ids = torch.tensor([[50256, 464, 3290, 318, 257, 1332, 13, 198]])  # (1, T)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits  # (1, T, V)
        got = plain(input_ids=ids).logits
        base = build_builtin("tiny-gpt2").eval()(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the output
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


def test_adapter_only_export_keeps_the_adapter_and_names_its_base(lora_run, tiny_run, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from dpolab.hub.export import is_export

    out = tmp_path / "adapter-export"
    assert main(["export", str(lora_run.path), str(out), "--adapter-only"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert adapter_base(out) == "tiny-gpt2" and is_export(out)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert "LoRA adapter only" in card.text and "`tiny-gpt2`" in card.text
    # tiny-gpt2 is a built-in, not a Hub model: no snippet telling readers to download it.
    assert 'from_pretrained("tiny-gpt2")' not in card.text and "**not on the Hub**" in card.text
    adapted = load_adapter_model(out, build_builtin("tiny-gpt2"))  # the export alone reproduces the run
    ids = torch.tensor([[50256, 464, 3290]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(lora_run.model_dir)(input_ids=ids).logits
        assert torch.allclose(adapted(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    # A full fine-tuning run has no adapter to export: one line, exit 2.
    assert main(["export", str(tiny_run.path), str(tmp_path / "nope"), "--adapter-only"]) == 2
    assert "not a LoRA run" in capsys.readouterr().err


def test_qlora_on_cpu_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--output-dir", str(tmp_path / "q"), "--model", "tiny-gpt2", "--lora-r", "8",
                 "--load-in-4bit", "true", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "load_in_4bit (QLoRA) needs a CUDA GPU" in err
    with pytest.raises(ConfigError, match="set lora_r > 0"):
        TrainConfig(load_in_4bit=True)


def test_serve_an_adapter_only_export_with_its_base_as_reference(lora_run, tmp_path):
    """A real local server on the adapter-only export: one model in memory; the compare view's
    reference is the base with the adapter disabled, and the answers carry implicit rewards."""
    import json
    import urllib.request

    from dpolab.serve import create_app
    from dpolab.serve.models import AdapterView, LoadedModel, answer_logps, load_served_models
    from dpolab.serve.server import ServerThread

    out = tmp_path / "adapter"
    assert main(["export", str(lora_run.path), str(out), "--adapter-only"]) == 0
    served = load_served_models(str(out))
    assert isinstance(served.policy.model, AdapterView) and served.reference.model.module is served.policy.model.module
    prompt, answer = load_tokenizer("tiny-gpt2")("\n\nHuman: Hi\n\nAssistant:").input_ids, [464, 3290, 50256]
    base = LoadedModel("base", "tiny-gpt2", build_builtin("tiny-gpt2").eval(), served.policy.tokenizer)
    merged = LoadedModel("merged", "run", AutoModelForCausalLM.from_pretrained(lora_run.model_dir).eval(),
                         served.policy.tokenizer)
    assert answer_logps(served.reference, prompt, [answer]) == pytest.approx(answer_logps(base, prompt, [answer]), abs=1e-4)
    assert answer_logps(served.policy, prompt, [answer]) == pytest.approx(answer_logps(merged, prompt, [answer]), abs=1e-4)

    app = create_app({"TESTING": True, "MODELS": served, "PREFERENCES_PATH": str(tmp_path / "prefs.jsonl"),
                      "MAX_NEW_TOKENS": 16, "DEFAULT_MAX_NEW_TOKENS": 8, "WORKERS": 1, "MAX_QUEUE": 2,
                      "REQUEST_TIMEOUT_S": 60.0})
    with ServerThread(app) as url:
        request = urllib.request.Request(f"{url}/api/generate", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"prompt": "Hi there", "compare": True}).encode())
        body = json.loads(urllib.request.urlopen(request, timeout=120).read())
    app.extensions["dpolab.engine"].close()
    assert [a["role"] for a in body["answers"]] == ["policy", "reference"]
    assert all(isinstance(a["reward"], float) for a in body["answers"]), body["answers"]
