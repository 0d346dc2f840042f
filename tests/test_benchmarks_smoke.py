"""Each benchmark script runs end to end on tiny-gpt2 in seconds and writes the JSON fields that
BENCHMARKS.md is built from. These are smoke runs: no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def subprocess_env() -> dict[str, str]:
    """Read when a test runs, after conftest's session fixture pointed DPOLAB_CACHE at the test cache."""
    return {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def _run(script: str, args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|" in proc.stdout  # the markdown table was printed
    return json.loads(out.read_text())


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    pytest.importorskip("trl")
    data = _run("train_throughput.py", ["--models", "tiny-gpt2", "--variants", "dpolab", "trl_tuned",
                                        "dpolab_token_budget", "--repeats", "1", "--steps", "1", "--warmup", "1",
                                        "--batch", "2", "--gradient-accumulation-steps", "2", "--max-length", "128",
                                        "--max-tokens-per-batch", "256", "--profile-dir", str(tmp_path / "profile")],
                tmp_path / "train.json")
    for variant in ("dpolab", "trl_tuned"):  # torch.profiler's op table, then cProfile's Python functions
        table = (tmp_path / "profile" / f"profile_{variant}.txt").read_text()
        assert "Self CPU time total" in table and "aten::mm" in table and "cumulative" in table, variant
    assert "dpolab/dpo/trainer.py" in (tmp_path / "profile" / "profile_dpolab.txt").read_text()
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["cpu_model"]
    assert {r["variant"] for r in data["runs"]} == {"dpolab", "trl_tuned", "dpolab_token_budget"}
    for run in data["runs"]:
        assert run["measured_steps"] == 1 and run["pairs"] == 4  # 2 micro-batches of 2 pairs, or one budget
        assert run["max_tokens_per_batch"] == (256 if run["variant"] == "dpolab_token_budget" else None)
        for key in ("pairs_per_s", "tokens_per_s", "amortised_pairs_per_s", "peak_rss_mb", "reference_s"):
            assert run[key] > 0, key
        assert run["amortised_pairs_per_s"] < run["pairs_per_s"]  # the reference pass costs something
        assert run["compute_dtype"] == "fp32"  # --dtype fp32: measured against the fp32 GEMM rate
        assert 0 < run["gemm_share"] < 1  # a 3.4M-parameter model's step is far below the machine's GEMM rate
    for when in ("before", "after"):  # the machine's GEMM rate, in the same invocation, both dtypes
        assert data["gemm"][when]["fp32_tflops"] > 0 and data["gemm"][when]["bf16_tflops"] > 0
    assert data["gemm"]["fp32_tflops"] == max(data["gemm"]["before"]["fp32_tflops"],
                                              data["gemm"]["after"]["fp32_tflops"])
    variants = data["summary"]["tiny-gpt2"]["variants"]
    assert set(variants["dpolab"]["pairs_per_s"]) == {"median", "min", "max", "n"}
    sys.path.insert(0, str(BENCHMARKS))
    from train_throughput import markdown_table

    table = markdown_table(data)
    assert "GEMM rate, GPT-2 shapes" in table and "of GEMM rate (its dtype)" in table
    assert f"{variants['dpolab']['gemm_share']['median']:.1%}" in table
    ratios = data["summary"]["tiny-gpt2"]["ratios"]
    assert ratios["dpolab_vs_trl_tuned"]["pairs_per_s"] > 0 and ratios["dpolab_token_budget_vs_dpolab"]["pairs_per_s"] > 0
    assert "dpolab_token_budget_vs_dpolab" in table


def test_packed_attention_smoke(tmp_path):
    data = _run("packed_attention.py", ["--pairs", "2", "--repeats", "1", "--caps", "256", "4096", "--max-length",
                                        "128"], tmp_path / "attention.json")
    assert set(data["results"]) == {"padded", "packed, row_tokens 256", "packed, row_tokens 4096"}
    assert data["results"]["padded"]["rows"] == 4 and data["results"]["packed, row_tokens 4096"]["rows"] == 1
    assert data["results"]["padded"]["vs_padded"] == 1.0
    assert all(r["seconds"]["median"] > 0 for r in data["results"].values())


@pytest.mark.slow
def test_generate_latency_smoke(tmp_path):
    data = _run("generate_latency.py", ["--model", "tiny-gpt2", "--repeats", "1", "--new-tokens", "3",
                                        "--prompt-tokens", "16", "--quality-pairs", "1", "--agree-prompts", "1",
                                        "--agree-tokens", "3"], tmp_path / "gen.json")
    assert set(data["results"]) == {"plain_fp32", "fp32", "bf16", "int8"}
    for precision, result in data["results"].items():
        assert result["ttft_ms"]["median"] > 0, precision
        assert "ratio_to_floor" in result and "speedup_vs_plain_fp32" in result
        quality = data["quality"][precision]
        assert 0 <= quality["greedy_agreement"] <= 1
        assert quality["answer_nll_per_token"] > 0
    assert data["quality"]["plain_fp32"]["greedy_agreement"] == 1.0  # the reference agrees with itself
    assert data["prompt_tokens"] == 16 and data["new_tokens"] == 3


@pytest.mark.slow
def test_gpu_check_cpu_path_end_to_end(tmp_path):
    """The GPU check's own CPU path: every stage runs from source (PYTHONPATH=src, no install) and
    leaves its figures and the run/sweep records, without model weights, in the results folder."""
    out = tmp_path / "results"
    env = {**subprocess_env(), "PYTHONPATH": "", "OUT": str(out)}  # $OUT picks the folder; dpolab comes from src/
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--dtype", "fp32",
                           "--quick", "--model", "tiny-gpt2", "--variants", "dpolab", "--steps", "1", "--warmup",
                           "1", "--repeats", "1", "--batch", "2", "--max-length", "128", "--train-steps", "2",
                           "--gen-tokens", "3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(
        ["throughput", "generation", "train", "sweep"], "ok")
    dpolab = stages["throughput"]["summary"]["tiny-gpt2"]["variants"]["dpolab"]
    assert dpolab["pairs_per_s"]["median"] > 0 and dpolab["model_tflops_per_s"]["median"] > 0
    assert set(stages["generation"]["summary"]) == {"plain_fp32", "fp32", "bf16"}
    assert stages["train"]["summary"]["train"]["steps"] == 2 and stages["train"]["model_saved"]
    assert stages["sweep"]["best"]["trial"] in stages["sweep"]["trial_eval_loss"]
    assert (out / "train" / "summary.json").is_file() and (out / "train" / "system.jsonl").is_file()
    assert (out / "sweep" / "best.json").is_file() and (out / "sweep" / "trials" / "lr1e-3" / "summary.json").is_file()
    assert not list(out.rglob("*.safetensors")) and not (out / "train" / "model").exists()  # records only
    assert "| throughput | ok |" in (out / "gpu_check.md").read_text()
    assert "stage train" in (out / "gpu_check.log").read_text()


def test_gpu_check_without_cuda_fails_in_one_line(tmp_path):
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path)}  # no GPU visible, whatever the machine
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py")], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert "CUDA is not available" in proc.stderr and "--device cpu" in proc.stderr


def test_mfu_inputs():
    """The two numbers MFU is built from, for GPT-2 124M on an H100: the datasheet's bf16 dense peak,
    and the FLOPs per trained token that the throughput benchmark computes from the real model and
    data, against the same number worked out by hand from GPT-2's shapes."""
    sys.path.insert(0, str(BENCHMARKS))
    from common import gpu_peak_tflops
    from train_throughput import _flops_per_token

    from dpolab.model import build_builtin

    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and gpu_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0 and gpu_peak_tflops("Some Future GPU") is None

    # By hand, GPT-2 124M (L = 12 layers, H = 768, V = 50257), weights a token is multiplied by:
    #   per layer: qkv 768*2304 + 2304 = 1,771,776; attn proj 768*768 + 768 = 590,592;
    #              mlp up 768*3072 + 3072 = 2,362,368; mlp down 3072*768 + 768 = 2,360,064;
    #              two layer norms 2 * 1536 = 3,072                      -> 7,087,872
    #   12 layers 85,054,464 + final layer norm 1,536                    -> 85,056,000
    #   LM head V*H = 50257*768 = 38,597,376 (tied to the input embedding, still a matmul)
    #   N = 123,653,376; the input and position embeddings are lookups, not counted.
    # One pair: a 2-token prompt, a 3-token chosen and a 1-token rejected answer -> sequences of 5 and 3
    # tokens, token-weighted mean length T = (5*5 + 3*3) / (5 + 3) = 4.25.
    # 6 N + 12 L H T = 741,920,256 + 470,016 = 742,390,272 FLOPs per trained token.
    pairs = {"prompt_ids": [[1, 2]], "chosen_ids": [[3, 4, 5]], "rejected_ids": [[6]]}
    assert _flops_per_token(build_builtin("gpt2-124m-random"), pairs) == 742_390_272


def test_gpu_check_fsdp_comparison(tmp_path):
    """The FSDP stage's verdict: it passes only when Trainer really wrapped the model and the losses agree."""
    sys.path.insert(0, str(BENCHMARKS))
    from gpu_check import compare_fsdp

    from dpolab.runs import RunFolder

    def run(name: str, losses: list[float], units: int) -> Path:
        folder = RunFolder.create(tmp_path / name, {"engine": "dpolab"})
        for step, loss in enumerate(losses, 1):
            folder.append_metrics({"split": "train", "step": step, "loss": loss})
        folder.write_summary({"eval": {"loss": 0.69}})
        (folder.path / "wrapping.json").write_text(json.dumps({"model_class": "X", "fsdp2_units": units}))
        return folder.path

    plain = run("plain", [0.6931, 0.6900, 0.6800], 0)
    assert compare_fsdp(plain, run("fsdp", [0.6931, 0.69001, 0.68002], 3))["max_abs_diff"] < 1e-4
    with pytest.raises(RuntimeError, match="did not wrap"):
        compare_fsdp(plain, run("not-wrapped", [0.6931, 0.6900, 0.6800], 0))
    with pytest.raises(RuntimeError, match="differ"):
        compare_fsdp(plain, run("diverged", [0.6931, 0.6950, 0.6800], 3))


@pytest.mark.slow
def test_data_prep_smoke(tmp_path):
    data = _run("data_prep.py", ["--repeat", "1", "--variants", "after"], tmp_path / "data.json")
    (run,) = data["runs"]
    assert run["rows_read"] == 2312 and run["kept"] == {"train": 2073, "eval": 230}
    assert run["seconds"] > 0 and run["peak_rss_mb"] > 0 and run["cache_hit_s"] > 0
