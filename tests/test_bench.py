"""The benchmark harness runs, interleaves, and writes its tables (numbers are not asserted: timing is noise)."""

import csv

import pytest
import torch

import benchmark as bench
import compconv
from scripts import bench_layers


@pytest.mark.slow  # measures peak memory in a spawned process
def test_benchmark_writes_markdown_and_csv(tmp_path):
    out = tmp_path / "bench.md"
    assert bench.main(["--models", "resnet18,resnet18_compconv128", "--workloads", "infer:1,train:2",
                       "--settings", "eager-nchw,eager-cl", "--img-size", "32", "--repeats", "2",
                       "--min-seconds", "0.01", "--warmup", "1", "--out", str(out), "--memory-settings", "eager-nchw"]) == 0
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert len(rows) == 8 and {r["model"] for r in rows} == {"resnet18", "resnet18_compconv128"}
    for row in rows:
        assert float(row["img_per_s"]) > 0
        # growth over the RSS after a warm-up step: 0 where glibc keeps the small blocks of a tiny cell
        assert (float(row["peak_mem_mb"]) >= 0) if row["setting"] == "eager-nchw" else row["peak_mem_mb"] == ""
        if row["model"] == "resnet18":
            assert float(row["speed_ratio"]) == 1.0 and float(row["ideal_ratio"]) == 1.0
            assert float(row["paired_ratio"]) == float(row["paired_q1"]) == float(row["paired_q3"]) == 1.0
        else:
            assert float(row["ideal_ratio"]) > 2  # resnet18 MACs / CompConv128 MACs
    text = out.read_text()
    assert "## train, batch 2, eager-cl" in text
    profile = bench_layers.profile_ops("resnet18_compconv128", bench.Workload("infer", 1), bench.Setting.parse("eager-cl"),
                                       torch.device("cpu"), 32, "fp32")
    assert "convolution" in profile


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--models", "resnet51"])
    with pytest.raises(SystemExit):
        bench.main(["--workloads", "infer"])


@pytest.mark.slow
def test_deploy_variants_ort_and_per_layer_table(tmp_path):
    import torch

    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = bench.create_variant("resnet18_compconv128").eval()(x)
        for variant in ("deploy", "deploy_rule", "reparam"):  # same seed, same weights: deploy keeps the outputs
            torch.manual_seed(1)
            model = bench.create_variant(f"resnet18_compconv128+{variant}", x)
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
            # every layer in its inference form (timm's path: each CompConv2d.fuse(); 1x1 downsamples go dense)
            assert not any(isinstance(m, compconv.EfficientCompConv2d) for m in model.modules()), variant
            assert type(model.layer2[0].downsample[0]).__name__ in ("Conv2d", "LowRankConv2d"), variant
    out = tmp_path / "opt.md"
    assert bench.main(["--models", "resnet18,resnet18_compconv128+deploy", "--workloads", "infer:2",
                       "--settings", "eager-cl,ort", "--img-size", "32", "--repeats", "1", "--min-seconds", "0.01",
                       "--warmup", "1", "--memory-settings", "none", "--out", str(out)]) == 0
    assert "## infer, batch 2, ort" in out.read_text()
    table = bench_layers.per_layer_table("resnet18_compconv128", 2, 32, torch.device("cpu"), repeats=1)
    assert "| layer2.0.downsample.0 | 64->128, 1, 2 | 1 |" in table and "**all replaced layers**" in table
    with pytest.raises(ValueError, match="unknown variant"):
        bench.create_variant("resnet18_compconv128+fast")
    rounded = bench.create_variant("resnet18_compconv128+c_prim_divisor=16+plain")
    layers = [m for m in rounded.modules() if hasattr(m, "plan")]
    assert layers and all(m.plan.c_prim % 16 == 0 and type(m) is compconv.CompConv2d for m in layers)
    with pytest.raises(ValueError, match="unknown CompConv option"):
        bench.create_variant("resnet18_compconv128+bogus=1")
    with pytest.raises(ValueError, match="ort setting is inference"):
        bench.build_step("resnet18", bench.Workload("train", 2), bench.Setting.parse("ort"), torch.device("cpu"), 32,
                         "fp32")


def test_per_layer_training_table_and_plain_variant(tmp_path):
    table = bench_layers.per_layer_train_table("resnet18_compconv128", 2, 32, torch.device("cpu"), repeats=1)
    lines = table.splitlines()
    assert lines[0].startswith("| layer | C_in->C_out") and lines[-1].startswith("| **all replaced layers**")
    assert any("| lowrank |" in line for line in lines) and any("| chain |" in line for line in lines)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    plain = bench.create_variant("resnet18_compconv128+plain")
    assert {type(m) for m in plain.modules() if hasattr(m, "plan")} == {compconv.CompConv2d}


@pytest.mark.slow  # two spawned processes
def test_peak_memory_is_the_models_own():
    import torch

    small = bench.peak_memory_mb("resnet18_compconv128", bench.Workload("train", 2), bench.Setting.parse("eager-cl"),
                                 torch.device("cpu"), 32, "fp32")
    large = bench.peak_memory_mb("resnet18_compconv128", bench.Workload("train", 32), bench.Setting.parse("eager-cl"),
                                 torch.device("cpu"), 32, "fp32")
    assert 0 < small < large < 2000  # grows with the batch; no parent's high-water mark


def test_paired_ratio_is_the_median_of_per_repeat_ratios():
    from benchmark import paired_ratio

    # a machine that slows down over the repeats: every repeat has the model at 2x, the medians of rates do not
    reference = [10.0, 5.0, 4.0, 2.0, 1.0]
    model = [20.0, 10.0, 8.0, 4.0, 2.0]
    assert paired_ratio(model, reference) == (2.0, 2.0, 2.0)
    assert paired_ratio([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == (2.0, 1.5, 2.5)
    assert paired_ratio([3.0], [2.0]) == (1.5, 1.5, 1.5)


def test_timing_environment_is_written_before_the_command(monkeypatch):
    for name in list(bench.os.environ):
        if name in bench.TIMING_ENVIRONMENT or name.startswith("MALLOC_"):
            monkeypatch.delenv(name)
    assert bench.timing_environment() == ""
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4294967296")
    monkeypatch.setenv("MALLOC_ARENA_NOT_A_TUNABLE", "x")  # glibc's tunables end in "_"
    assert bench.timing_environment() == "MALLOC_MMAP_THRESHOLD_=4294967296 THP_MEM_ALLOC_ENABLE=1 "


@pytest.mark.slow  # a spawned process
def test_peak_memory_says_so_when_its_process_dies():
    with pytest.raises(RuntimeError, match="peak-memory process of resnet18_compconv128\\+bogus died"):
        bench.peak_memory_mb("resnet18_compconv128+bogus", bench.Workload("train", 2), bench.Setting.parse("eager-cl"),
                             torch.device("cpu"), 32, "fp32")
