"""The command line a new user meets first: help that names every method, `methods list/show`, `--dry-run`,
`--no-eval`, progress off a terminal, cheap start-up, and the same paths from Python (soarbench.train/evaluate/
report)."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from soarbench.methods import METHODS

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, model: Path, jsonl: Path, extra: str = "") -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{model}"\nmax_sequence_length = 0\n[data]\njsonl = "{jsonl}"\n'
                   f'[method]\nname = "soar"\ntrajectory_length = 2\n[budget]\nunit = "fwd_bwd"\namount = 40\n'
                   f'[train]\nbatch_size = 4\n{extra}')
    return cfg


# ------------------------------------------------------------------------------------------------ help and methods
def test_help_and_train_method_name_every_registered_method(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = cli("train", "--help")
    assert code == 0
    # every built-in method (the help is written when the CLI is imported; a plugin's method, like the toy one a
    # contract test registers, is listed by `soarbench methods list`)
    builtin = [name for name in METHODS.names() if METHODS.load(name).__module__.startswith("soarbench.")]
    assert len(builtin) >= 9
    for name in builtin:
        assert name in out
    code, out, _ = cli("--help")
    assert code == 0 and "methods" in out and "DiffusionNFT" in out and "(SFT, SOAR, Flow-GRPO)" not in out


def test_methods_list_has_one_row_per_method_with_paper_and_reconstruction(cli):
    code, out, err = cli("methods", "list")
    assert code == 0 and err == ""
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()[1:]}
    assert sorted(rows) == METHODS.names()
    assert rows["soar"][1:4] == ["arXiv 2604.12617", "no", "Tencent-Hunyuan/HY-SOAR"]
    assert rows["flow_grpo"][1:4] == ["arXiv 2505.05470", "no", "yifan123/flow_grpo"]
    # the methods whose version says "reconstructed" (no public code), and only those
    reconstructed = {n for n in METHODS.names() if "reconstructed" in METHODS.load(n).version}
    assert reconstructed == {"actor_critic", "seppo"}
    assert {n for n, r in rows.items() if r[2] == "yes"} == reconstructed
    assert rows["sft"][4] == "images" and rows["flow_grpo"][4] == "prompts"


def test_methods_show_lists_every_constructor_option_with_its_default(cli):
    from soarbench.methods.sft import SFT
    from soarbench.methods.soar import SOAR

    code, out, err = cli("methods", "show", "soar")
    assert code == 0 and err == ""
    lines = out.splitlines()
    table = lines[lines.index("option\ttype\tdefault\tmeaning") + 1:]
    shown = {line.split("\t")[0]: line.split("\t") for line in table}
    # SOAR's own parameters and, through **sft_options, SFT's
    expected = {n: p.default for cls in (SOAR, SFT) for n, p in inspect.signature(cls.__init__).parameters.items()
                if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}
    assert set(shown) == set(expected)
    assert shown["lambda_aux"][1:3] == ["a number", "1.0"]
    assert shown["trajectory_length"][1:3] == ["an integer", "6"]
    assert shown["sde_type"][1:3] == ["a string", '"flow_sde"']
    assert shown["lambda_aux"][3].startswith("weight of the auxiliary")
    code, out, err = cli("methods", "show", "flow_grpo")
    assert "global_std\ttrue or false\ttrue\t" in out and "rewards\ta table of numbers\t(none)\t" in out
    code, _, err = cli("methods", "show", "soarr")
    assert code == 2 and err == ("error: unknown method 'soarr' (valid: " + ", ".join(METHODS.names()) +
                                 "); did you mean 'soar'?")


def test_every_option_of_every_method_has_a_meaning_and_no_meaning_is_stale():
    from soarbench import config as C
    from soarbench.method_info import _METHOD_OPTIONS, method_info

    for name in METHODS.names():
        params = set(C._constructor_parameters(METHODS.load(name)))
        assert set(_METHOD_OPTIONS.get(name, {})) <= params, name  # a renamed option leaves no orphan line
        info = method_info(name)
        assert set(info["options"]) == params
        assert [k for k, o in info["options"].items() if not o["meaning"]] == [], name


# ------------------------------------------------------------------------------------------------ --dry-run
def test_train_dry_run_prints_the_resolved_config_and_plan_and_writes_nothing(cli, tmp_path, tiny_model_dir,
                                                                           shapes_data):
    cfg = _config(tmp_path, tiny_model_dir, shapes_data)
    out = tmp_path / "run"
    code, stdout, err = cli("train", "--config", cfg, "--set", "budget.amount=80", "--dry-run", "--out", out)
    assert code == 0 and err == ""
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]
    assert "[method]\nname = \"soar\"" in stdout and "trajectory_length = 2" in stdout
    assert "amount = 80.0" in stdout  # --set applied
    assert "lambda_aux = 1.0" in stdout  # defaults filled in
    # SOAR with L = 2, M = 1 on a batch of 4: 4 + 2 x 4 = 12 fwd+bwd per step; 80 buys 6 steps
    assert "fwd+bwd 12," in stdout and "-> 6 optimizer steps" in stdout
    assert "evaluation: none" in stdout


def test_run_dry_run_prints_every_run_and_creates_no_folder(cli, tmp_path, tiny_model_dir, shapes_data):
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[experiment]\nname = "t"\n[common.model]\npath = "{tiny_model_dir}"\nmax_sequence_length = 0\n'
                   f'[common.data]\njsonl = "{shapes_data}"\n[common.budget]\nunit = "fwd_bwd"\namount = 16\n'
                   f'[common.train]\nbatch_size = 4\n[runs.sft.method]\nname = "sft"\n'
                   f'[runs.soar]\nseeds = [0, 1]\n[runs.soar.method]\nname = "soar"\n')
    out = tmp_path / "out"
    code, stdout, err = cli("run", exp, "--dry-run", "--set", "common.budget.amount=32", "--out", out)
    assert code == 0 and err == "" and not out.exists()
    assert stdout.count("# dry run: ") == 3 and "run 'soar-s1'" in stdout
    assert "-> 8 optimizer steps" in stdout  # sft: 32 fwd+bwd / 4 per step, after --set


def test_dry_run_reports_a_bad_config_in_one_line(cli, tmp_path, tiny_model_dir, shapes_data):
    cfg = _config(tmp_path, tiny_model_dir, shapes_data, "lrr = 1.0\n")
    code, out, err = cli("train", "--config", cfg, "--dry-run", "--out", tmp_path / "run")
    assert code == 2 and out == "" and err == "error: config: unknown key 'train.lrr' (did you mean 'train.lr'?)"


# ------------------------------------------------------------------------------------------------ --no-eval
def test_no_eval_trains_without_any_evaluation(cli, tmp_path, tiny_model_dir, shapes_data):
    cfg = _config(tmp_path, tiny_model_dir, shapes_data,
                  '[eval]\nbenchmark = "shapes"\npoints = 0\nnum_steps = 1\n[eval.benchmark_options]\nn_per_tag = 1\n')
    code, plan, _ = cli("train", "--config", cfg, "--dry-run", "--out", tmp_path / "r")
    assert code == 0 and "evaluation: shapes, at 1 fraction(s)" in plan  # points = 0 still evaluates the end
    code, plan, _ = cli("train", "--config", cfg, "--dry-run", "--no-eval", "--out", tmp_path / "r")
    assert code == 0 and "evaluation: none" in plan
    code, _, err = cli("train", "--config", cfg, "--no-eval", "--set", "budget.amount=12", "--out", tmp_path / "r")
    assert code == 0, err
    assert (tmp_path / "r" / "done.json").is_file() and not (tmp_path / "r" / "evals").exists()


# ------------------------------------------------------------------------------------------------ several processes
@pytest.mark.parametrize("is_main", [True, False])
def test_training_progress_is_reported_by_the_main_process_only(tmp_path, is_main):
    from soarbench.harness.train import Run

    calls = []
    run = SimpleNamespace(_last={"step": 3, "loss": 0.5, "grad_norm": 1.5, "lr": 1e-4}, counters=SimpleNamespace(
        as_dict=lambda: {}), engine=SimpleNamespace(is_main=is_main), out_dir=tmp_path, writer=None, step=3,
        total_steps=10, progress=lambda done, total, **values: calls.append((done, total, values)))
    Run.log_step(run)
    assert calls == ([(3, 10, {"loss": 0.5, "grad_norm": 1.5})] if is_main else [])


def test_shipped_shapes_configs_fix_the_global_batch_at_16():
    from soarbench import config as C
    from soarbench.experiment import plan_runs
    from soarbench.harness.train import accumulation_steps

    configs = []
    for path in sorted((REPO / "benchmarks" / "shapes").glob("*.toml")):
        raw = C.load_config(path)
        configs += [(path.name, cfg) for _, cfg in plan_runs(raw)] if "runs" in raw else (
            [(path.name, raw)] if "method" in raw else [])
    assert len(configs) > 10
    for name, cfg in configs:
        train = C.validate_train_config(cfg)["train"]
        assert train["global_batch_size"] == 16, name
        # one process: one micro-batch of 16, as before the global batch was set (the same results)
        assert (accumulation_steps(train, 1), train["batch_size"]) == (1, 16), name
        with pytest.raises(Exception, match="not a multiple of batch_size 16 x 2 process"):
            accumulation_steps(train, 2)  # never a silent global batch of 32
        assert accumulation_steps({**train, "batch_size": 8}, 2) == 1


# ------------------------------------------------------------------------------------------------ the end of eval / run
def test_results_table_reads_each_folders_last_evaluation(tmp_path):
    from soarbench.cli import results_table

    for run, step, score in (("sft-s0", 0, 0.25), ("sft-s0", 12, 0.5), ("soar-s0", 7, 0.625)):
        folder = tmp_path / run / "evals" / f"step_{step:06d}" / "shapes"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"scores": {"geneval": score, "geneval/image_mean": 0.1}}))
    assert results_table([tmp_path / "sft-s0", tmp_path / "soar-s0", tmp_path / "empty"]) == [
        "run\tstep\tbenchmark\tscores",
        "sft-s0\tstep 12\tshapes\tgeneval=0.5000 geneval/image_mean=0.1000",
        "soar-s0\tstep 7\tshapes\tgeneval=0.6250 geneval/image_mean=0.1000"]


# ------------------------------------------------------------------------------------------------ start-up
HEAVY = ("torch", "diffusers", "transformers")
_PROBE = """
import sys
sys.argv = ["soarbench", *sys.argv[1:]]
from soarbench.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
print("HEAVY", code, [m for m in {heavy!r} if m in sys.modules])
"""


@pytest.mark.parametrize("args,code", [
    (["--help"], 0),
    (["train", "--help"], 0),
    (["eval", "--model", "{missing}", "--benchmark", "shapes", "--out", "{out}"], 2),
    (["eval", "--model", "{model}", "--benchmark", "shapes", "--metrics", "nope", "--out", "{out}"], 2),
    (["train", "--config", "{missing}.toml", "--out", "{out}"], 2),
    (["export", "{missing}", "--out", "{out}"], 2),
    # a config's method options are checked against the method's class, which imports torch: not diffusers
    (["train", "--config", "{cfg}", "--out", "{out}"], 2),  # its model.path is missing
    (["train", "--config", "{cfg}", "--dry-run", "--out", "{out}"], 2),
])
def test_help_and_input_checks_import_no_torch(args, code, tmp_path, tiny_model_dir):
    subs = {"{missing}": str(tmp_path / "no-such-model"), "{out}": str(tmp_path / "out"),
            "{model}": str(tiny_model_dir), "{cfg}": str(_config(tmp_path, tmp_path / "no-model", tmp_path / "d.jsonl"))}
    argv = [subs.get(a, a.replace("{missing}", str(tmp_path / "none"))) for a in args]
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    last = proc.stdout.strip().splitlines()[-1]
    expected = "['torch']" if "{cfg}" in args else "[]"
    assert last == f"HEAVY {code} {expected}", (proc.stdout[-500:], proc.stderr[-500:])
    if code == 2:
        assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_import_soarbench_is_cheap_and_still_fixes_torchvision_first():
    proc = subprocess.run([sys.executable, "-c", "import sys, soarbench; print([m for m in ('torch', 'torchvision') "
                           "if m in sys.modules]); import torchvision; print('soarbench._compat' in sys.modules)"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]", "True"]


# ------------------------------------------------------------------------------------------------ the Python API
def test_python_api_trains_evaluates_and_reports(tmp_path, tiny_model_dir, shapes_data, capsys):
    import soarbench

    cfg = {"model": {"path": str(tiny_model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(shapes_data)},
           "method": {"name": "sft"}, "budget": {"unit": "fwd_bwd", "amount": 80}, "train": {"batch_size": 4},
           "eval": {"benchmark": "shapes"}}
    logged = []
    run = soarbench.train(cfg, tmp_path / "run", overrides=["budget.amount=8"], evaluate=False, log=logged.append)
    assert cfg["budget"]["amount"] == 80  # the caller's dict is left as it was
    assert run.out == tmp_path / "run" and run.run["method"] == "sft" and run.evals == {}
    assert run.last_checkpoint == tmp_path / "run" / "checkpoints" / "step_000002"  # 8 fwd+bwd / 4 per step
    assert any(line.startswith("budget: 8 fwd_bwd") for line in logged)
    result = soarbench.evaluate(run.last_checkpoint, benchmark="shapes", out=tmp_path / "eval", steps=1,
                                options={"n_per_tag": 1, "images_per_prompt": 1})
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert result.out == tmp_path / "eval" and result.scores == summary["scores"] and "geneval" in result.scores
    assert callable(soarbench.evaluate) and callable(soarbench.report)  # the modules of those names, imported now
    paths = soarbench.report([tmp_path / "eval"], tmp_path / "report", formats="csv,md")
    assert paths and all(p.exists() and (tmp_path / "report") in (p, *p.parents) for p in paths.values())
    assert {p.suffix for p in paths.values()} >= {".csv", ".md"} and ".html" not in {p.suffix for p in paths.values()}
    assert not (tmp_path / "eval" / ".soarbench.lock").exists()
    with pytest.raises(soarbench.errors.UserError, match="model folder does not exist"):
        soarbench.evaluate(tmp_path / "nope", benchmark="shapes", out=tmp_path / "e2")
    assert "dry run" in soarbench.dry_run(cfg)


def test_the_readme_python_snippet_runs_as_written(tmp_path):
    """README.md's "From Python" example, run as written from a folder beside the checkout's benchmarks/."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("```python\n", readme.index("**From Python**")) + len("```python\n")
    snippet = readme[start:readme.index("```", start)]
    (tmp_path / "benchmarks").symlink_to(REPO / "benchmarks")
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    # each print's comment in the README says what it prints
    assert lines[0] == "runs/api-sft/checkpoints/step_000010 16"
    score, out = lines[1].split()
    assert 0 <= float(score) <= 1 and out == "evals/api-sft"
    assert lines[2] == "reports/api-sft/index.html" and (tmp_path / lines[2]).is_file()


def test_run_ends_with_a_results_table_the_report_and_the_folder(cli, tmp_path, tiny_model_dir, shapes_data):
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[experiment]\nname = "t"\nreport = "{tmp_path / "report"}"\n'
                   f'[common.model]\npath = "{tiny_model_dir}"\nmax_sequence_length = 0\n'
                   f'[common.data]\njsonl = "{shapes_data}"\n[common.budget]\nunit = "fwd_bwd"\namount = 8\n'
                   f'[common.train]\nbatch_size = 4\n[common.eval]\nbenchmark = "shapes"\nnum_steps = 1\n'
                   f'[common.eval.benchmark_options]\nn_per_tag = 1\nimages_per_prompt = 1\n'
                   f'[runs.sft.method]\nname = "sft"\n')
    out = tmp_path / "out"
    code, stdout, err = cli("run", exp, "--out", out)
    assert code == 0, err
    lines = stdout.splitlines()
    scores = {name: json.loads((out / name / "evals" / f"step_{step:06d}" / "shapes" / "summary.json").read_text())
              ["scores"]["geneval"] for name, step in (("base", 0), ("sft-s0", 2))}
    assert lines[0] == "run\tstep\tbenchmark\tscores"
    assert lines[1].startswith(f"base\tstep 0\tshapes\tgeneval={scores['base']:.4f}")
    assert lines[2].startswith(f"sft-s0\tstep 2\tshapes\tgeneval={scores['sft-s0']:.4f}")
    assert lines[3:] == [f"report\t{tmp_path / 'report'}", f"out\t{out}"]
