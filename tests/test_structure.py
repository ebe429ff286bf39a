"""The package's structure, checked on its source: import layering, no private imports across modules, file
sizes, a self-contained text (no internal paths, no issue numbers), cheap imports, and CLI flags generated from the
config dataclasses."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lowbit"

# What each part of lowbit may import (besides itself). Anything else is a layering violation.
ALLOWED = {
    "io": set(),
    "safetensors_io": set(),
    "rundir": {"io"},
    "data": {"io"},
    "quant": {"io", "safetensors_io"},
    "models": {"io", "data", "safetensors_io"},
    "adapters": {"io", "quant"},
    "eval": {"io", "data"},
    "recipes": {"io", "rundir", "data", "quant", "models", "adapters", "eval"},
    # The experiment runner sits on the product drivers and never reaches below them into the algorithms.
    "experiments": {"io", "rundir", "eval", "recipes"},
    # The CLI parses arguments only: everything it runs (and the config classes it builds flags from) comes through
    # the drivers and the experiment runner.
    "cli": {"recipes", "experiments", "cli_flags"},
    "cli_flags": {"recipes"},
    "__init__": set(),
    "__main__": {"cli"},
}


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, root: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every import in the file, lazy (in-function) ones included."""
    mod = _module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names], node.lineno))
    return out


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lowbit":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _violations(pkg: Path) -> list[str]:
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        me = _module_name(path, pkg.parent)
        mine = _part(me)
        for target, names, line in _imports(path, pkg.parent):
            other = _part(target)
            if other is None:
                continue
            where = f"{path.relative_to(pkg.parent)}:{line}"
            # ``lowbit`` itself holds only ``__version__``: anyone may read it.
            if other != mine and other != "__init__" and other not in ALLOWED.get(mine, set()):
                bad.append(f"{where}: lowbit.{mine} imports {target} (layer {other!r} is above it)")
            if any(p.startswith("_") and not p.startswith("__") for p in target.split(".")[1:]):
                bad.append(f"{where}: imports private module {target}")
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != me:
                    bad.append(f"{where}: imports private name {n} from {target}")
    return bad


def test_import_layering_and_no_private_imports():
    assert _violations(PKG) == []


def test_the_layering_check_fails_on_violations(tmp_path):
    """The check itself: a quant module importing eval, and a private name across modules, are both caught."""
    fake = tmp_path / "lowbit"
    (fake / "quant").mkdir(parents=True)
    (fake / "eval").mkdir()
    (fake / "quant" / "__init__.py").write_text("")
    (fake / "eval" / "__init__.py").write_text("")
    (fake / "eval" / "answers.py").write_text("def _helper():\n    pass\n")
    (fake / "quant" / "bad.py").write_text("def f():\n    from ..eval.answers import _helper\n")
    found = _violations(fake)
    assert any("layer 'eval' is above it" in v for v in found)
    assert any("private name _helper" in v for v in found)


def _long_functions(root: Path, limit: int = 60) -> list[str]:
    """Functions (def line to last body line, decorators excluded) longer than ``limit`` lines under ``root``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root.parent.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_product_drivers_read_top_to_bottom():
    """No function in lowbit/recipes/ is longer than 60 lines: a driver is a list of named steps."""
    assert _long_functions(PKG / "recipes") == []


def test_the_length_check_fails_on_a_long_function(tmp_path):
    (tmp_path / "lowbit" / "recipes").mkdir(parents=True)
    (tmp_path / "lowbit" / "recipes" / "long.py").write_text("def f():\n" + "    x = 1\n" * 61)
    assert len(_long_functions(tmp_path / "lowbit" / "recipes")) == 1


# Choices made from recipe or cell *names* (a method's kind belongs to its config and the registries): a method word
# tested for membership in, or as the ending/start of, a string.
METHOD_WORDS = r"(diablo|lora|cloq|loftq|apiq|qlora|gptq|magr|calibrated)"
NAME_CHECKS = [re.compile(r"[\"'][\w-]*" + METHOD_WORDS + r"[\w-]*[\"']\s+(not\s+)?in\s+\w"),
               re.compile(r"\.(endswith|startswith)\(\(?\s*[\"'][^\"']*" + METHOD_WORDS)]


def _name_checks(pkg: Path) -> list[str]:
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in NAME_CHECKS):
                bad.append(f"{path.relative_to(pkg.parent)}:{i}: {line.strip()}")
    return bad


def test_no_choices_from_recipe_names():
    assert _name_checks(PKG) == []


def test_the_name_check_catches_the_old_patterns(tmp_path):
    (tmp_path / "lowbit").mkdir()
    (tmp_path / "lowbit" / "a.py").write_text('if "diablo" not in recipe:\n    pass\n'
                                              'z = [c for c in cells if c.name.endswith(("gptq-lora", "x"))]\n')
    assert len(_name_checks(tmp_path / "lowbit")) == 2


def test_model_aliases_live_in_lowbit_models():
    """Every alias registration is in lowbit/models/ (one room: the registry, the tiny model, SmolLM2)."""
    outside = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if "models" not in p.relative_to(PKG).parts[:1]
               and re.search(r"^@register_model_alias|^MODEL_ALIASES\s*[:=]", p.read_text(), re.MULTILINE)]
    assert outside == []
    from lowbit.models import MODEL_ALIASES

    assert {"tiny", "smollm2-135m"} <= set(MODEL_ALIASES)


def test_files_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def _texts():
    for base in ("lowbit", "tests", "benchmarks", "scripts", "docs"):
        for p in (ROOT / base).rglob("*"):
            if p.suffix in (".py", ".md", ".yaml", ".txt") and p.is_file():
                yield p
    yield ROOT / "README.md"


def test_self_contained_text():
    """No internal spec paths: the only ``shared/`` path is the documented LOWBIT_DATA_DIR default. No issue numbers."""
    shared = re.compile("shared" + "/")
    issue = re.compile(r"\b(issue|task)s? #?\d+", re.IGNORECASE)
    bad = []
    for p in _texts():
        if p == Path(__file__).resolve():
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            for m in shared.finditer(line):
                if line[max(0, m.start() - 3): m.end() + 4] != "../" + "shared/data":
                    bad.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
            if issue.search(line):
                bad.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert bad == []


def test_pure_parts_import_without_transformers():
    code = ("import sys; import lowbit; assert 'torch' not in sys.modules, 'import lowbit loads torch'; "
            "from lowbit.eval import extract_answer, is_correct, EvalConfig; import lowbit.data; "
            "from lowbit.quant import QuantConfig, quantize_model; "
            "assert 'transformers' not in sys.modules, 'transformers loaded'; "
            "assert not __import__('torch').cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_quantize_flags_are_the_config_fields():
    """`lowbit quantize --help` lists one flag per QuantConfig field in its quantization group (``options`` aside),
    one flag per quantizer option (the union of the registered options classes) in its own group, and the other
    flags are exactly the fields of the run and calibration configs."""
    import dataclasses

    from lowbit.cli import OPTION_DEST, build_parser, quant_options_from_args
    from lowbit.recipes.config import CalibrationConfig, QuantConfig
    from lowbit.recipes.quantize import QuantizeRun

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["quantize"]
    groups = {g.title: {a.dest for a in g._group_actions} for g in sub._action_groups}
    fields = {c: {f.name for f in dataclasses.fields(c)} for c in (QuantConfig, CalibrationConfig, QuantizeRun)}
    options = set(QuantConfig.option_fields())
    assert {"act_order", "static_groups", "damp", "magr_iters", "magr_solver"} <= options
    assert groups["quantization (QuantConfig)"] == fields[QuantConfig] - {"options"}
    option_group = next(t for t in groups if t.startswith("quantizer options"))
    assert groups[option_group] == {OPTION_DEST + n for n in options}
    assert groups["calibration"] == fields[CalibrationConfig]
    assert groups["run"] == fields[QuantizeRun] - {"quant", "calibration"}
    help_text = sub.format_help()
    for name in (fields[QuantConfig] - {"options"}) | options:
        assert "--" + name.replace("_", "-") in help_text
    # The flags present become the method's options; a flag of another method is refused, naming the method.
    args = parser.parse_args(["quantize", "--model", "m", "--out", "o", "--method", "magr-gptq", "--bits", "2",
                              "--magr-iters", "7", "--no-act-order", "--damp", "0.05"])
    opts = quant_options_from_args(args, args.method)
    assert opts == {"magr_iters": 7, "act_order": False, "damp": 0.05}
    assert QuantConfig(method="magr-gptq", bits=2, options=opts).options.magr_iters == 7
    args = parser.parse_args(["quantize", "--model", "m", "--out", "o", "--method", "rtn", "--bits", "2",
                              "--act-order"])
    with pytest.raises(ValueError, match="--act-order is an option of --method gptq / magr-gptq; --method rtn"):
        quant_options_from_args(args, args.method)


def test_field_help_names_real_fields():
    import dataclasses

    from lowbit import cli
    from lowbit.eval.config import EvalConfig
    from lowbit.recipes.config import CalibrationConfig, QuantConfig
    from lowbit.recipes.evaluate import EvaluateRun
    from lowbit.recipes.export_run import ExportRun
    from lowbit.recipes.pretrain_tiny import PretrainConfig
    from lowbit.recipes.quantize import QuantizeRun

    classes = {c.__name__: c for c in (QuantConfig, CalibrationConfig, QuantizeRun, EvaluateRun, EvalConfig,
                                       ExportRun, PretrainConfig)}
    for table in (cli.FIELD_HELP, cli.CHOICES):
        for cls_name, helps in table.items():
            assert set(helps) <= {f.name for f in dataclasses.fields(classes[cls_name])}, cls_name


@pytest.mark.parametrize("argv", [["quantize", "--help"], ["evaluate", "--help"], ["pretrain-tiny", "--help"]])
def test_help_runs(argv, capsys):
    from lowbit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "--" in capsys.readouterr().out


def test_file_map_lists_every_file():
    """Every file of the repository (bar many-of-a-kind folders, named by one glob) appears in docs/FILES.md; the
    README's short map names only paths that exist."""
    import fnmatch

    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    readme = (ROOT / "docs" / "FILES.md").read_text()
    named = set(re.findall(r"`([^`\s]+)`", readme))
    short = [p for p in re.findall(r"^- `([^`\s]+)`", (ROOT / "README.md").read_text().split("## File map")[1],
                                   re.MULTILINE)]
    assert short and all((ROOT / p.rstrip("/")).exists() for p in short)
    globs = [n for n in named if "*" in n]
    wanted = [f for f in out.stdout.splitlines() if (ROOT / f).is_file() and "__pycache__" not in f and (
        f.split("/")[0] in ("lowbit", "tests", "benchmarks", "scripts", "docs") or f in (
            "Makefile", "pyproject.toml", ".ci/run"))]
    missing = [f for f in wanted if f not in named and not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert missing == []


# Error text is for people: code reads a typed error's attributes (``DamagedFileError.reason``/``.path``,
# ``RunDirError.state``), never the message.
_EXC = r"str\((?:e|err|exc|error)\)"  # the text of a caught exception
_PARSES_MESSAGE = re.compile(rf"""split\(["']; re-create|{_EXC}\.(split|startswith|endswith|find|index)\(|"""
                             rf"""["'][^"'\n]*["']\s+(not\s+)?in\s+{_EXC}|re\.\w+\([^)\n]*{_EXC}""")


def _message_parsing(pkg: Path) -> list[str]:
    return [f"{p.relative_to(pkg)}:{k}: {line.strip()}" for p in sorted(pkg.rglob("*.py"))
            for k, line in enumerate(p.read_text().splitlines(), 1) if _PARSES_MESSAGE.search(line)]


def test_no_code_parses_error_messages():
    assert _message_parsing(PKG) == []


def test_the_message_parsing_check_catches_each_form(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text('x = str(e).split("; re-create it")[0]\n'
                              'y = "checksum mismatch" in str(err)\n'
                              'z = str(e).startswith("x")\n'
                              'ok = str(e)[:120]\n')
    assert [v.split(":")[1] for v in _message_parsing(pkg)] == ["1", "2", "3"]
