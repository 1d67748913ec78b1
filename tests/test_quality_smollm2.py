"""The SmolLM2 quality benchmark end to end on a tiny random Llama (with SmolLM2's tokenizer) and the committed
real-data sample: every method runs, the table and files are written, LoRA's rank matches ALTER's task-adapter
parameters, prefix routing equals routing by task ids, and `--resume` trains nothing twice."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import quality_smollm2  # noqa: E402
from modeling_alter.packaged_models import packaged_model_path  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer, saved like a real checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _arguments(tiny_llama, output_dir):
    return ["--model", str(tiny_llama), "--data_dir", str(FIXTURES), "--tasks", "sst2", "agnews", "--quick",
            "--seeds", "0", "--adapter_dim", "8", "--output_dir", str(output_dir), "--work_dir",
            str(output_dir / "work"), "--num_threads", "1"]


def test_every_method_runs_and_resume_trains_nothing_twice(tiny_llama, tmp_path, monkeypatch):
    record = quality_smollm2.main(_arguments(tiny_llama, tmp_path))
    seed = record["per_seed"]["0"]
    assert set(seed) == set(quality_smollm2.METHODS)
    for method, result in seed.items():
        assert set(result["scores"]) == {"sst2", "agnews", "mean"}, method
        assert 0.0 <= result["overall"] <= 1.0
    # Majority label: each task's most frequent training target, scored on eval.
    assert seed["majority_label"]["trainable_parameters"] == 0
    # LoRA's rank gives the parameters of ALTER's task adapters (2 tasks x 2 x hidden x r x layers), up to rounding.
    alter_adapters = 2 * 2 * 32 * 8 * 2
    assert seed["alter_frozen"]["trainable_parameters"] == alter_adapters
    assert seed["alter_frozen"]["learning_rate"] == 1e-3  # --frozen_alter_lr, chosen on dev; LoRA keeps --adapter_lr
    per_rank = 2 * sum(i + o for i, o in ((32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)))
    assert seed["lora"]["lora_rank"] == round(alter_adapters / per_rank)
    # Prefix routing infers exactly the task ids, so it scores the same as routing with them.
    assert seed["alter_prefix"]["scores"] == seed["alter_two_stage"]["scores"]
    assert seed["alter_two_stage"]["stage1_steps_trained"] == seed["alter_stage1"]["steps_trained"]
    for method in quality_smollm2.TRAINED:
        assert seed[method]["curve"] and seed[method]["tokens_per_second"] > 0
        assert seed[method]["cpu"] == quality_smollm2.cpu_description()  # its tokens/s are this CPU's
    table = (tmp_path / "results.md").read_text()
    assert "| ALTER two-stage |" in table and "alter_two_stage minus alter_stage1" in table
    summary = table.split("\n\n")[0].split("\n")  # the short table the README quotes comes first
    assert summary[0].startswith("| method (2 real tasks, overall %, mean ± std over its seeds) | seeds | overall |")
    assert any(line.startswith("| Multi-task full fine-tuning | 1 | ") for line in summary)
    assert len(summary) == 2 + len(quality_smollm2.METHODS)
    assert any(line.startswith("| ALTER two-stage, no task ids, gate only |") and "(stage 2)" in line
               for line in summary)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert len(record["criteria"]) == 4
    assert sum(line.startswith(("- Met: ", "- NOT met: ")) for line in table.split("\n")) == 4
    assert json.loads((tmp_path / "runs" / "seed0.json").read_text()).keys() == seed.keys()

    monkeypatch.setattr(quality_smollm2, "train_to_plateau", lambda *a, **k: pytest.fail("trained again"))
    again = quality_smollm2.main(_arguments(tiny_llama, tmp_path) + ["--resume"])
    assert again["per_seed"]["0"]["full_ft"]["overall"] == seed["full_ft"]["overall"]
    assert again["resumed_with"]


def test_missing_data_folder_is_one_error_line(tiny_llama, tmp_path):
    with pytest.raises(SystemExit, match="error: the task data folder .*nowhere does not exist"):
        quality_smollm2.main(["--model", str(tiny_llama), "--data_dir", str(tmp_path / "nowhere"), "--quick"])


def test_speed_mode_measures_every_trained_method_in_both_precisions(tiny_llama, tmp_path):
    rows = quality_smollm2.main(_arguments(tiny_llama, tmp_path) + ["--speed", "--speed_steps", "1"])
    assert set(rows) == {"full_ft", "lora", "poly", "alter_stage1", "alter_frozen", "alter_stage2"}
    assert all(row["fp32"] > 0 and row["bf16"] > 0 for row in rows.values())
    assert "| alter_stage2 |" in (tmp_path / "speed.md").read_text()
    cpu = quality_smollm2.cpu_description()
    assert json.loads((tmp_path / "speed.json").read_text())["cpu"] == cpu
    assert quality_smollm2.cpu_text(cpu) in (tmp_path / "speed.md").read_text()


def test_interim_report_reads_finished_methods_and_trains_nothing(tiny_llama, tmp_path, monkeypatch):
    quality_smollm2.main(_arguments(tiny_llama, tmp_path) + ["--methods", "majority_label", "full_ft"])
    monkeypatch.setattr(quality_smollm2, "train_to_plateau", lambda *a, **k: pytest.fail("trained"))
    threads = torch.get_num_threads()
    try:  # the report command's own thread count must not be reported as the runs'
        record = quality_smollm2.main(_arguments(tiny_llama, tmp_path) + ["--report", "--seeds", "0", "1",
                                                                            "--num_threads", "2"])
    finally:
        torch.set_num_threads(threads)
    assert list(record["per_seed"]) == ["0"] and set(record["per_seed"]["0"]) == {"majority_label", "full_ft"}
    report = (tmp_path / "results.md").read_text()
    assert "interim report" in record["command"] and "| Multi-task full fine-tuning | 1 (seed 0) |" in report
    assert "- Validity gate, seed 0: " in report and list(record["validity_gate"]) == [0]
    # The setup line names the seeds reported and the threads the runs used, not those of the report command.
    this_cpu = quality_smollm2.cpu_text(quality_smollm2.cpu_description())
    assert "seeds [0];" in report and f"(1 thread, {this_cpu}: " in report
    assert "Compute time of the finished runs" in report
    assert "minutes per method: full_ft " in report
    with pytest.raises(SystemExit, match="no finished method"):
        quality_smollm2.main(_arguments(tiny_llama, tmp_path / "empty") + ["--report"])


@pytest.mark.parametrize("method_name", ["full_ft", "poly", "alter_stage1"])
def test_a_method_interrupted_mid_training_resumes_where_it_stopped(tiny_llama, tmp_path, monkeypatch, method_name):
    """Killed after its first dev evaluation, a method (the backbone trained, a PEFT model routed by task ids, ALTER)
    continues from its checkpoint and ends with the weights, curve and step count of the uninterrupted run; the
    checkpoint is gone once the result is recorded."""
    args = quality_smollm2.parse_arguments(_arguments(tiny_llama, tmp_path))
    args.patience = 9  # no early stop: 6 steps, dev evaluations at 2, 4 and 6
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data = quality_smollm2.TaskData(args, tokenizer)
    checkpoint = quality_smollm2.checkpoint_path(args, 0, method_name)

    def train(max_steps_before_crash=None):
        torch.manual_seed(0)
        method = quality_smollm2.build_method(args, method_name, data.tasks, tokenizer, torch.bfloat16)
        real = quality_smollm2.generate_scores
        calls = []

        def crashing(*a, **k):
            calls.append(1)
            if max_steps_before_crash is not None and len(calls) > max_steps_before_crash:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(quality_smollm2, "generate_scores", crashing)
        try:
            record = quality_smollm2.train_to_plateau(method, data, args, 0, "test", 6, 2, checkpoint)
        finally:
            monkeypatch.setattr(quality_smollm2, "generate_scores", real)
        return method, record

    straight, straight_record = train()
    checkpoint.unlink()
    with pytest.raises(KeyboardInterrupt):
        train(max_steps_before_crash=1)  # the second dev evaluation (step 4) never happens
    assert torch.load(checkpoint, weights_only=False)["state"]["step"] == 2
    resumed, resumed_record = train()
    assert resumed_record["steps_trained"] == straight_record["steps_trained"] == 6
    assert [s for _, s in resumed_record["curve"]] == pytest.approx([s for _, s in straight_record["curve"]])
    for (name, a), (_, b) in zip(straight.module.named_parameters(), resumed.module.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)

    quality_smollm2.finish_checkpoint(args, 0, method_name)
    assert not checkpoint.exists()


def test_paired_with_compares_each_method_with_the_same_method_and_seed_of_another_run(tiny_llama, tmp_path, capsys):
    plain = quality_smollm2.main(_arguments(tiny_llama, tmp_path / "plain") + ["--methods", "alter_stage1"])
    gated = quality_smollm2.main(_arguments(tiny_llama, tmp_path / "gated") + [
        "--methods", "majority_label", "alter_stage1", "--adapter_form", "gated",
        "--paired_with", str(tmp_path / "plain")])
    a, b = gated["per_seed"]["0"]["alter_stage1"], plain["per_seed"]["0"]["alter_stage1"]
    assert a["trainable_parameters"] != b["trainable_parameters"]  # the gated form has a third matrix
    pair = gated["paired_with"]["alter_stage1"]
    assert set(gated["paired_with"]) == {"alter_stage1"} and pair["seeds"] == [0]  # the floor is only in one run
    assert pair["eval"]["deltas"] == [a["overall"] - b["overall"]]
    assert pair["dev"]["deltas"] == [a["best_dev"] - b["best_dev"]]
    report = (tmp_path / "gated" / "results.md").read_text()
    assert f"Paired with `{tmp_path / 'plain'}`" in report
    assert "- ALTER stage 1 (backbone + task adapters) (seeds [0]): dev " in report and "; eval " in report
    with pytest.raises(SystemExit) as exit_info:
        quality_smollm2.parse_arguments(_arguments(tiny_llama, tmp_path / "x") + ["--paired_with", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "error: --paired_with" in capsys.readouterr().err


def test_train_rows_overrides_the_rows_of_one_task_and_rejects_bad_values(tiny_llama, tmp_path, capsys):
    args = quality_smollm2.parse_arguments(_arguments(tiny_llama, tmp_path) + ["--train_rows", "agnews=5"])
    assert args.train_rows == {"agnews": 5}
    data = quality_smollm2.TaskData(args, AutoTokenizer.from_pretrained(tiny_llama))
    assert len(data.train["agnews"]) == 5 and len(data.train["sst2"]) == args.num_train_per_task
    for bad in ("agnews", "nosuchtask=5", "agnews=0", "agnews=many"):
        with pytest.raises(SystemExit) as exit_info:
            quality_smollm2.parse_arguments(["--train_rows", bad])
        assert exit_info.value.code == 2
        assert f"--train_rows {bad!r}: expected TASK=N" in capsys.readouterr().err


def test_recipe_criteria_need_every_seed_the_stage2_time_budget_and_prefix_within_two_points():
    def pair(*deltas):
        return dict(mean=sum(deltas) / len(deltas), std=0.0, better=sum(d > 0 for d in deltas), seeds=len(deltas),
                    deltas=list(deltas))

    def runs(*stage2_seconds):
        return {seed: {"alter_two_stage": {"train_seconds": t, "stage1_train_seconds": 1000.0}}
                for seed, t in enumerate(stage2_seconds)}

    pairs = {"alter_two_stage - full_ft": pair(0.03, 0.01, 0.02),
             "alter_frozen - lora": pair(0.01, -0.005, 0.02),  # one seed behind: not met
             "alter_two_stage - alter_stage1": pair(0.01, 0.01, 0.02),
             "alter_prefix - alter_two_stage": pair(0.0, -0.021, 0.0)}  # 2.1 points off in one seed
    criteria = quality_smollm2.recipe_criteria(pairs, runs(60, 80, 100))
    assert [c["met"] for c in criteria.values()] == [True, False, True, False]
    assert "2/3 seeds" in criteria["frozen-backbone ALTER above LoRA (equal trainable parameters) in every seed"]["detail"]
    stage2 = "stage 2 above its own stage-1 weights at ≤ 10 % of stage 1's training time"
    assert criteria[stage2]["detail"].endswith("time share 6 %, 8 %, 10 %")
    assert not quality_smollm2.recipe_criteria(pairs, runs(60, 101, 100))[stage2]["met"]  # over the time budget
    # A criterion whose rows have not finished is not judged.
    assert list(quality_smollm2.recipe_criteria({"alter_two_stage - full_ft": pair(0.01)}, {})) == [
        "ALTER two-stage above multi-task full fine-tuning in every seed"]
    assert quality_smollm2.render_criteria(criteria).count("- NOT met: ") == 2


def test_a_row_finished_in_fewer_seeds_is_reported_over_its_own_seeds_and_paired_over_shared_ones():
    both = {"full_ft": run_record(0.70, 100.0), "alter_two_stage": run_record(0.72, 100.0),
            "alter_stage1": run_record(0.71, 100.0)}
    per_seed = {0: {**both, "lora": run_record(0.66, 100.0), "alter_frozen": run_record(0.69, 100.0)},
                1: dict(both, full_ft=run_record(0.74, 100.0)), 2: dict(both)}
    for results in per_seed.values():
        results["alter_two_stage"].update(stage1_train_seconds=1000.0, train_seconds=50.0)
    summary, pairs = quality_smollm2.summarize(per_seed, ["sst2"])
    assert summary["lora"]["seeds"] == [0] and summary["full_ft"]["seeds"] == [0, 1, 2]
    assert pairs["lora - full_ft"]["seed_ids"] == [0] and pairs["lora - full_ft"]["mean"] == pytest.approx(-0.04)
    assert pairs["alter_frozen - lora"]["deltas"] == [pytest.approx(0.03)]
    assert pairs["alter_two_stage - full_ft"]["better"] == 2 and pairs["alter_two_stage - full_ft"]["seeds"] == 3
    table = quality_smollm2.render_summary(summary, pairs, per_seed, ["sst2"]).split("\n")
    assert table[0].startswith("| method (1 real tasks, overall %, mean ± std over its seeds) | seeds | overall |")
    lora = next(line for line in table if line.startswith("| Multi-task LoRA"))
    assert "| 1 (seed 0) | 66.0 | -4.0 (0/1 better) |" in lora  # one seed: no ± to print
    full_ft = next(line for line in table if line.startswith("| Multi-task full fine-tuning |"))
    assert "| 3 | 71.3 ± 2.3 | — |" in full_ft
    assert "| 1 (seed 0) | 66.0 |" in quality_smollm2.render(summary, pairs, per_seed, ["sst2"], None)
    criteria = quality_smollm2.recipe_criteria(pairs, per_seed)
    frozen = "frozen-backbone ALTER above LoRA (equal trainable parameters) in every seed"
    assert criteria[frozen]["met"] and (criteria[frozen]["seeds"], criteria[frozen]["of_seeds"]) == (1, 3)
    lines = quality_smollm2.render_criteria(criteria).split("\n")
    assert f"- Met so far (1 of 3 seeds): {frozen} (1/1 seeds, +3.0 ± 0.0 points)" in lines
    assert "- NOT met: ALTER two-stage above multi-task full fine-tuning in every seed (2/3 seeds" in lines[0]
    # An interim report of a 3-seed grid where only seed 0 has finished: "so far", not "met".
    only_seed0 = {0: per_seed[0]}
    summary0, pairs0 = quality_smollm2.summarize(only_seed0, ["sst2"])
    criteria0 = quality_smollm2.recipe_criteria(pairs0, only_seed0, planned_seeds=3)
    assert all(line.startswith("- Met so far (1 of 3 seeds): ")
               for line in quality_smollm2.render_criteria(criteria0).split("\n"))
    assert "| Multi-task full fine-tuning | 1 (seed 0) |" in quality_smollm2.render_summary(
        summary0, pairs0, only_seed0, ["sst2"], planned_seeds=3)
    notes = quality_smollm2.render(summary, pairs, per_seed, ["sst2"], None)
    assert "- alter_frozen minus lora: +3.00 points (1/1 seeds better; seed 0)" in notes


def test_validity_gate_needs_twenty_points_overall_and_every_classification_task_above_its_floor():
    def row(overall, **accuracies):
        scores = {t: {"accuracy": accuracies.get(t, 0.5)} for t in ("sst2", "cola")}
        return {"overall": overall, "scores": {**scores, "samsum": {"rouge_l": 0.3}}}

    tasks = ["sst2", "cola", "samsum"]
    floor = row(0.34, sst2=0.55, cola=0.67)
    per_seed = {
        0: {"majority_label": floor, "full_ft": row(0.76, sst2=0.87, cola=0.74)},  # passes
        1: {"majority_label": floor, "full_ft": row(0.71, sst2=0.86, cola=0.67)},  # cola at its floor
        2: {"majority_label": floor, "full_ft": row(0.53, sst2=0.86, cola=0.70)},  # +19 overall
        3: {"majority_label": floor},  # no full FT yet: not judged
    }
    gate = quality_smollm2.validity_gate(per_seed, tasks)
    assert list(gate) == [0, 1, 2] and [gate[s]["passes"] for s in gate] == [True, False, False]
    assert set(gate[0]["task_margins"]) == {"sst2", "cola"}  # samsum is not a classification task
    assert gate[1]["task_margins"]["cola"] == pytest.approx(0.0)
    assert gate[2]["overall_margin"] == pytest.approx(0.19)
    lines = quality_smollm2.render_gate(gate).split("\n")
    assert lines[0].startswith("- Validity gate, seed 0: passes (") and "+42.0 overall" in lines[0]
    assert "seed 1: FAILS" in lines[1] and "lowest classification task cola +0.0" in lines[1]


def test_compute_seconds_counts_a_shared_stage2_record_once():
    record = dict(train_seconds=100.0, eval_seconds=20.0, eval_seconds_final=5.0)
    per_seed = {0: {"full_ft": dict(record), "alter_two_stage": dict(record), "alter_prefix": dict(record),
                    "alter_gate_only": dict(record), "majority_label": {}}}
    assert quality_smollm2.compute_seconds(per_seed) == {"full_ft": 125.0, "alter_two_stage": 125.0,
                                                          "alter_prefix": 5.0, "alter_gate_only": 5.0,
                                                          "majority_label": 0}


def run_record(overall, speed, amx=None, **extra):
    cpu = {} if amx is None else {"cpu": {"name": "Intel Xeon", "cores": 2, "amx_bf16": amx}}
    return dict(overall=overall, scores={"sst2": {"accuracy": overall}}, tokens_per_second=speed,
                train_seconds=10.0, **cpu, **extra)


def test_tokens_per_second_are_averaged_per_kind_of_cpu_never_across_them():
    per_seed = {0: {"full_ft": run_record(0.7, 300.0)}, 1: {"full_ft": run_record(0.8, 100.0, amx=False)},
                2: {"full_ft": run_record(0.9, 200.0, amx=True)}}
    summary, _ = quality_smollm2.summarize(per_seed, ["sst2"])
    speeds = summary["full_ft"]["tokens_per_second"]
    assert set(speeds) == {"AMX", "no AMX"}  # a run without the field predates it: the AMX machine
    assert speeds["AMX"][0] == pytest.approx(250.0) and speeds["no AMX"][0] == pytest.approx(100.0)
    assert quality_smollm2.tokens_per_second_cell(summary["full_ft"]) == "250 / 100 (no AMX)"
    assert quality_smollm2.cpus_text(per_seed) == ("x86 CPU (2 cores, AMX bf16 units): 1 trained run; Intel Xeon "
                                                   "(2 cores, no AMX units): 1 trained run; Intel Xeon (2 cores, AMX "
                                                   "bf16 units): 1 trained run")


def test_tokens_per_second_of_runs_at_other_thread_counts_stay_apart():
    per_seed = {0: {"full_ft": run_record(0.7, 300.0, amx=False, num_threads=2)},
                1: {"full_ft": run_record(0.8, 60.0, amx=False, num_threads=1)},
                2: {"full_ft": run_record(0.9, 64.0, amx=False, num_threads=1)}}
    summary, _ = quality_smollm2.summarize(per_seed, ["sst2"])
    assert set(summary["full_ft"]["tokens_per_second"]) == {"no AMX", "no AMX, 1 thread"}
    assert quality_smollm2.tokens_per_second_cell(summary["full_ft"]) == "300 (no AMX) / 62 (no AMX, 1 thread)"


def test_zero_shot_is_scored_once_and_reused_by_the_other_seeds(tiny_llama, tmp_path, monkeypatch):
    quality_smollm2.main(_arguments(tiny_llama, tmp_path) + ["--methods", "zero_shot"])
    first = json.loads((tmp_path / "runs" / "seed0.json").read_text())["zero_shot"]
    monkeypatch.setattr(quality_smollm2, "load_backbone", lambda *a, **k: pytest.fail("scored zero-shot again"))
    record = quality_smollm2.main(_arguments(tiny_llama, tmp_path) + ["--methods", "zero_shot", "--seeds", "0", "1",
                                                                        "--resume"])
    reused = record["per_seed"]["1"]["zero_shot"]
    assert reused["scores"] == first["scores"] and reused["reused_from_seed"] == 0
    assert reused["eval_seconds_final"] == 0.0  # its scoring time counts once, in seed 0
    # Another precision is another model: not reused.
    assert quality_smollm2.scored_in_other_seed(quality_smollm2.parse_arguments(
        _arguments(tiny_llama, tmp_path) + ["--precision", "fp32"]), 1, "zero_shot") is None


def test_mta_on_attention_too_doubles_the_adapters_and_lora_follows(tiny_llama, tmp_path):
    arguments = _arguments(tiny_llama, tmp_path) + ["--methods", "alter_frozen", "lora", "--mta_placement", "ffn",
                                                    "self_attention"]
    seed = quality_smollm2.main(arguments)["per_seed"]["0"]
    alter_adapters = 2 * (2 * 2 * 32 * 8 * 2)  # both sublayers of both layers
    assert seed["alter_frozen"]["trainable_parameters"] == alter_adapters
    per_rank = 2 * sum(i + o for i, o in ((32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)))
    assert seed["lora"]["lora_rank"] == round(alter_adapters / per_rank)
    assert "MTA on every MLP and attention" in (tmp_path / "results.md").read_text()


def test_poly_lr_sets_polys_learning_rate_only(tiny_llama, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tasks = ["sst2", "agnews"]
    args = quality_smollm2.parse_arguments(_arguments(tiny_llama, tmp_path) + ["--poly_lr", "3e-3"])
    poly = quality_smollm2.build_method(args, "poly", tasks, tokenizer, torch.float32)
    lora = quality_smollm2.build_method(args, "lora", tasks, tokenizer, torch.float32)
    assert [g["lr"] for g in poly.groups] == [3e-3] and poly.extra["learning_rate"] == 3e-3
    assert [g["lr"] for g in lora.groups] == [5e-4] and lora.extra["learning_rate"] == 5e-4
    default = quality_smollm2.parse_arguments(_arguments(tiny_llama, tmp_path))
    assert quality_smollm2.build_method(default, "poly", tasks, tokenizer, torch.float32).groups[0]["lr"] == 5e-3
